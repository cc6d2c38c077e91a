"""One short training run with every monitoring backend on; each backend's output is read back
by that library's own reader and compared with metrics.jsonl. Also: the run directory's
artifacts (environment, tokenizer, results, PNG plots), benchmark mode, progress output."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from apt.core.config import load_profile
from apt.trainops.trainers import Trainer

STEPS = 6
PERF_KEYS = {"loss", "lr", "grad_norm", "step_time", "tokens_per_s", "tokens_per_s_per_device",
             "mfu", "data_wait_s", "loss_scale", "mem_rss_gib"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("monitored")
    saved = {k: os.environ.pop(k, None) for k in ("WANDB_API_KEY", "WANDB_MODE")}
    try:
        cfg = load_profile("tiny", [
            "data.max_corpus_bytes=200000", f"training.max_steps={STEPS}",
            "training.warmup_steps=2", "training.batch_size=8", "training.log_interval=2",
            "training.eval_interval=3", "training.eval_batches=2", "output.sample_tokens=0",
            f"output.dir={out}", "monitoring.tensorboard=true", "monitoring.wandb=true",
            "monitoring.mlflow=true", "training.eval_task=python_completion"])
        trainer = Trainer.from_config(cfg)
        summary = trainer.train()
    finally:
        os.environ.update({k: v for k, v in saved.items() if v is not None})
    (run_dir,) = list(out.iterdir())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if "loss" in r}
    evals = {r["step"]: r for r in records if "val_loss" in r}
    return dict(trainer=trainer, summary=summary, dir=run_dir, steps=steps, evals=evals)


def test_step_records_carry_performance_metrics(run):
    assert sorted(run["steps"]) == list(range(1, STEPS + 1)) and sorted(run["evals"]) == [3, 6]
    for record in run["steps"].values():
        assert PERF_KEYS <= record.keys()
        assert 0 < record["mfu"] < 1 and record["loss_scale"] == 1.0   # fp32: nothing scales
        assert record["data_wait_s"] >= 0 and record["mem_rss_gib"] > 0.05
    final = run["evals"][STEPS]
    assert 0 < final["val_accuracy"] < 1 and final["val_mc_python_completion_questions"] == 24
    s = run["summary"]
    assert s["flops_per_token"] == 5_111_808 and 0 < s["mfu"] < 1
    assert s["val_accuracy"] == final["val_accuracy"]


def test_tensorboard_events_read_back(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    (events,) = list((run["dir"] / "tensorboard").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert loss.keys() == run["steps"].keys()
    for step, value in loss.items():
        assert value == pytest.approx(run["steps"][step]["loss"], rel=1e-6)
    val = {e.step: e.value for e in acc.Scalars("eval/loss")}
    assert val == pytest.approx({k: v["val_loss"] for k, v in run["evals"].items()}, rel=1e-6)
    assert {"train/mfu", "train/lr", "train/tokens_per_s", "eval/accuracy"} <= set(
        acc.Tags()["scalars"])


def test_mlflow_run_read_back(run):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{run['dir']}/mlflow.db")
    experiment = client.get_experiment_by_name("tiny")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == run["dir"].name and found.info.status == "FINISHED"
    assert found.data.params["model.hidden_size"] == "128"
    history = client.get_metric_history(found.info.run_id, "train/loss")
    assert {m.step: m.value for m in history} == pytest.approx(
        {k: v["loss"] for k, v in run["steps"].items()}, rel=1e-9)
    lr = client.get_metric_history(found.info.run_id, "train/lr")
    assert [m.value for m in sorted(lr, key=lambda m: m.step)] == pytest.approx(
        [run["steps"][k]["lr"] for k in sorted(run["steps"])])
    val = client.get_metric_history(found.info.run_id, "eval/loss")
    assert {m.step: m.value for m in val} == pytest.approx(
        {k: v["val_loss"] for k, v in run["evals"].items()})


def test_wandb_offline_run_read_back(run):
    (offline,) = list((run["dir"] / "wandb").glob("offline-run-*"))   # no credentials: offline
    assert list(offline.glob("run-*.wandb"))
    # W&B's own reader of the run's transaction log (wandb leet inspect, wandb-core).
    wandb_cli = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(offline)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    history = [r["history"]["item"] for r in rows if r["type"] == "history"]
    loss = {h["_step"]: h["train/loss"] for h in history if "train/loss" in h}
    assert loss == pytest.approx({k: v["loss"] for k, v in run["steps"].items()}, rel=1e-9)
    val = {h["_step"]: h["eval/loss"] for h in history if "eval/loss" in h}
    assert val == pytest.approx({k: v["val_loss"] for k, v in run["evals"].items()})
    config = next(r for r in rows if r["type"] == "run")["run"]["config"]["update"]
    assert config["model"]["hidden_size"] == 128


def test_wandb_mode_follows_credentials(monkeypatch):
    from apt.trainops.monitoring.wandb_backend import resolve_mode
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online" and resolve_mode("offline") == "offline"


def test_run_directory_artifacts(run):
    from matplotlib.image import imread
    from apt.trainops.data import ByteTokenizer, load_tokenizer
    d = run["dir"]
    env = json.loads((d / "environment.json").read_text())
    assert {"torch", "megatron-core", "deepspeed"} <= env["versions"].keys()
    assert env["cpu"]["logical_cores"] >= 1 and env["memory_gib"] > 0 and env["python"]
    assert isinstance(load_tokenizer(d / "tokenizer"), ByteTokenizer)
    assert json.loads((d / "results" / "eval-step000003.json").read_text())["val_loss"] == \
        run["evals"][3]["val_loss"]
    for name in ("loss", "lr", "throughput"):
        png = d / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = imread(png).shape          # decodes: a valid image
        assert width > 300 and height > 200
    assert {"config.yaml", "plan.txt", "logs.txt", "summary.json", "model"} <= {
        p.name for p in d.iterdir()}


def test_benchmark_prints_one_summary_line(tmp_path, capsys):
    from apt.trainops.trainers.benchmark import run_benchmark
    cfg = load_profile("tiny", ["data.max_corpus_bytes=200000", "training.batch_size=4",
                                f"output.dir={tmp_path}"])
    result = run_benchmark(cfg, steps=3, warmup=1)
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("benchmark |")]
    assert lines == [result["line"]]
    assert result["steps"] == 3 and result["tokens_per_s"] > 0 and 0 < result["mfu"] < 1
    assert "tok/s" in result["line"] and "MFU" in result["line"] and "ms/step" in result["line"]


def test_progress_plain_lines_off_terminal_and_quiet_elsewhere(capsys):
    from apt.trainops.trainers.progress import Progress
    sink = []
    main = Progress(10, 0, enabled=True, sink=sink.append)    # pytest's stderr is no terminal
    assert main.bar is None
    main.update(5, 1.0, 100.0)
    main.line("step 5/10 | loss 1.0")
    Progress(10, 0, enabled=False).line("from another rank")
    assert capsys.readouterr().out == "step 5/10 | loss 1.0\n" and sink == ["step 5/10 | loss 1.0"]
