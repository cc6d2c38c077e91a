"""ClaudeTrainer (DPO) on real Megatron-core / DeepSpeed layouts, against one process.

One module fixture trains the one-process references in this process: live reference and
precomputed reference (the same losses), from weights saved once. Then one 2-process launch
(DP2 ZeRO-2, DP2 ZeRO-3, TP2, PP2, PP2 with the reference precomputed) and one 4-process
launch (TP2xPP2) must give the same per-step losses and reward metrics within 1e-5, and the
same held-out metrics over the whole held-out set. A run SIGKILLed after its mid-run
checkpoint and auto-resumed continues bit-identically.
"""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apt.core.config import load_profile
from apt.model.architectures import APTModel
from apt.trainops.checkpoints import CheckpointError, save_model_weights
from apt.trainops.runtime.process_groups import seed_everything, setup_distributed
from apt.trainops.trainers import ClaudeTrainer
from tests._launch import run_distributed

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "workers" / "train_layouts.py"
TOLERANCE = 1e-5
HYBRID = "training.distributed.strategy=hybrid"
STEPS = 3


def write_pairs(path: Path, n: int = 96, seed: int = 0) -> Path:
    """Addition questions: chosen the sum, rejected a near miss."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            miss = a + b + rng.choice([-10, -1, 1, 10])
            f.write(json.dumps({"prompt": f"{a}+{b}=", "chosen": str(a + b),
                                "rejected": str(miss)}) + "\n")
    return path


def _common(tmp, init, steps=STEPS):
    return ["model.hidden_size=64", "model.num_layers=4", "model.num_attention_heads=4",
            "model.num_query_groups=2", "model.ffn_hidden_size=128", "model.max_seq_len=32",
            "data.corpus=preference", f"data.path={tmp / 'pairs.jsonl'}", "data.val_fraction=0.2",
            f"data.cache_dir={tmp / 'cache'}", "data.seq_length=32",
            "training.objective=dpo", "training.dpo.beta=0.5",
            "training.batch_size=8", "training.micro_batch_size=2",
            f"training.max_steps={steps}", "training.warmup_steps=1",
            "training.learning_rate=3e-3", "training.min_learning_rate=3e-4",
            "training.log_interval=1", "training.eval_interval=0",
            # the whole held-out set on every layout (eval_batches counts per DP rank)
            "training.eval_batches=1000", "output.sample_tokens=0", f"output.dir={tmp / 'runs'}",
            f"training.init_from={init}"]


def _step_metrics(trainer):
    return [{k: v for k, v in r.items() if "/" in k or k == "loss"} for r in trainer.history]


def _eval_metrics(summary):
    return {k: v for k, v in summary.items() if k.startswith("val_") and "/" in k}


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo")
    write_pairs(tmp / "pairs.jsonl")
    init = tmp / "init"
    cfg = load_profile("tiny", _common(tmp, init) + ["training.init_from=null"])
    setup_distributed(plan=None)
    seed_everything(cfg.training.seed)
    save_model_weights([APTModel(cfg.model)], init)
    runs = {}
    saved = {k: os.environ.pop(k, None) for k in ("WANDB_API_KEY", "WANDB_MODE")}
    try:
        for mode, monitoring in (("live", ["monitoring.tensorboard=true", "monitoring.mlflow=true",
                                           "monitoring.wandb=true"]), ("precomputed", [])):
            trainer = ClaudeTrainer.from_config(load_profile(
                "tiny", _common(tmp, init) + [f"training.dpo.reference={mode}"] + monitoring))
            summary = trainer.train()
            runs[mode] = {"steps": _step_metrics(trainer), "eval": _eval_metrics(summary),
                          "initial": {k: v for k, v in summary.items()
                                      if k.startswith("initial_")},
                          "holds": trainer.objective.reference.nbytes,
                          "dir": trainer.artifacts.run_dir}
    finally:
        os.environ.update({k: v for k, v in saved.items() if v is not None})
    return tmp, runs


def test_step_zero_is_ln2_with_zero_rewards_and_reference_modes_agree(reference_runs):
    _, runs = reference_runs
    live, pre = runs["live"], runs["precomputed"]
    first = live["steps"][0]
    assert abs(first["loss"] - math.log(2)) < 1e-6
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert first[name] == 0.0, name
    assert abs(live["initial"]["initial_val_loss"] - math.log(2)) < 1e-6
    for a, b in zip(live["steps"], pre["steps"]):
        for key in a:
            assert abs(a[key] - b[key]) < 1e-6, (key, a[key], b[key])
    for key in live["eval"]:
        assert abs(live["eval"][key] - pre["eval"][key]) < 1e-6, key
    # the policy moved away from the reference, and the precomputed run holds no weights
    assert live["steps"][-1]["rewards/chosen"] != 0
    assert live["holds"] > 0 and pre["holds"] == 0


def test_reward_metrics_reach_metrics_jsonl_and_every_backend(reference_runs):
    """Each backend's own reader: TensorBoard's event accumulator, MLflow's client, W&B's
    transaction-log inspector."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, runs = reference_runs
    run_dir = runs["live"]["dir"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if "loss" in r}
    evals = {r["step"]: r for r in records if "val_loss" in r}
    names = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected")
    assert sorted(steps) == list(range(1, STEPS + 1)) and sorted(evals) == [0, STEPS]
    for record in steps.values():
        assert set(names) <= record.keys()
    assert {f"val_{n}" for n in names} <= evals[STEPS].keys()
    want = {s: r["rewards/margins"] for s, r in steps.items()}
    want_eval = {s: r["val_rewards/accuracies"] for s, r in evals.items()}

    acc = EventAccumulator(str(next((run_dir / "tensorboard").glob("events.*")).parent))
    acc.Reload()
    assert {e.step: e.value for e in acc.Scalars("train/rewards/margins")} == pytest.approx(
        want, rel=1e-6, abs=1e-7)
    assert {e.step: e.value for e in acc.Scalars("eval/rewards/accuracies")} == pytest.approx(
        want_eval)

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    (found,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    history = client.get_metric_history(found.info.run_id, "train/rewards/margins")
    assert {m.step: m.value for m in history} == pytest.approx(want, rel=1e-9)

    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    out = subprocess.run([str(Path(sys.executable).with_name("wandb")), "leet", "inspect",
                          "--json", str(offline)], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    history = [r["history"]["item"] for r in rows if r["type"] == "history"]
    got = {h["_step"]: h["eval/rewards/accuracies"] for h in history
           if "eval/rewards/accuracies" in h}
    assert got == pytest.approx(want_eval)


def _launch(tmp, nproc, layouts):
    spec = {"common": _common(tmp, tmp / "init"), "layouts": {
        name: {"set": overrides} for name, overrides in layouts.items()}}
    spec_path, out = tmp / f"spec{nproc}.json", tmp / f"out{nproc}.json"
    spec_path.write_text(json.dumps(spec))
    run_distributed(WORKER, nproc, ["--spec", str(spec_path), "--out", str(out)], timeout=900)
    return json.loads(out.read_text())


def _compare(runs, results):
    reference = runs["live"]["steps"]
    failures = []
    for name, result in results.items():
        steps = [{"loss": loss, **metrics}
                 for loss, metrics in zip(result["losses"], result["metrics"])]
        diff = max(abs(a[k] - b[k]) for a, b in zip(reference, steps) for k in a)
        print(f"{name:12s} engine {result['engine']:9s} max |step metric - one process| "
              f"{diff:.2e}")
        if len(steps) != STEPS or diff > TOLERANCE:
            failures.append(f"{name}: {diff:.2e}")
    assert not failures, failures


def test_layouts_match_one_process(reference_runs):
    tmp, runs = reference_runs
    two = _launch(tmp, 2, {
        "dp2_zero2": ["training.distributed.zero_stage=2"],
        "dp2_zero3": ["training.distributed.strategy=fsdp"],
        "tp2": [HYBRID, "training.distributed.tensor_parallel=2"],
        "pp2": [HYBRID, "training.distributed.pipeline_parallel=2"],
        "pp2_precomputed": [HYBRID, "training.distributed.pipeline_parallel=2",
                            "training.dpo.reference=precomputed"]})
    four = _launch(tmp, 4, {"tp2_pp2": [HYBRID, "training.distributed.tensor_parallel=2",
                                        "training.distributed.pipeline_parallel=2"]})
    _compare(runs, {**two, **four})


def _records(run_root: Path) -> dict:
    out = {}
    for metrics in sorted(run_root.glob("*/metrics.jsonl")):
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            if "loss" in record and "step" in record:
                out[record["step"]] = record
    return out


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                        "LOCAL_WORLD_SIZE")}   # this process's own group must not leak in
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_sigkill_after_mid_run_checkpoint_resumes_bit_identically(reference_runs, tmp_path):
    """launch/train.py under torchrun (DP2 ZeRO-2): an uninterrupted run, and one SIGKILLed
    (with its process group) once its step-3 checkpoint is committed, then auto-resumed under
    the deepspeed launcher on the same layout: steps 4-6 are bit-identical."""
    from apt.trainops.runtime.launcher_env import free_port
    tmp, _ = reference_runs
    steps = 6
    train = str(REPO / "launch" / "train.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", train]

    def sets(out, *extra):
        overrides = _common(tmp, tmp / "init", steps) + [
            f"output.dir={out}", f"training.checkpoints.dir={out}/ckpt",
            "training.checkpoints.save_interval=3", "training.checkpoints.async_save=false",
            "training.distributed.zero_stage=2",
            *extra]
        return ["--profile", "tiny"] + sum((["--set", o] for o in overrides), [])

    subprocess.run(torchrun + sets(tmp_path / "whole"), env=_env(), cwd=REPO, check=True,
                   capture_output=True, timeout=600)
    whole = _records(tmp_path / "whole")
    killed = tmp_path / "killed"
    proc = subprocess.Popen(torchrun + sets(killed), env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while not (killed / "ckpt" / "checkpoint-3" / "manifest.json").is_file():
        assert time.time() < deadline and proc.poll() is None, "no checkpoint-3 before the end"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 6 not in _records(killed), "killed too late: the run had finished"
    deepspeed = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2",
                 "--master_port", str(free_port()), train]
    subprocess.run(deepspeed + sets(killed, "training.checkpoints.auto_resume=true"),
                   env=_env(), cwd=REPO, check=True, capture_output=True, timeout=600)
    resumed = _records(killed)
    for step in range(4, steps + 1):
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert resumed[step][key] == whole[step][key], (step, key)


def test_resume_refuses_a_changed_reference(reference_runs, tmp_path):
    """The reference is rebuilt from training.init_from on resume: other weights there would
    silently change the loss, so the checkpoint's digest of it is checked."""
    tmp, _ = reference_runs
    common = _common(tmp, tmp / "init", steps=1) + [
        f"training.checkpoints.dir={tmp_path / 'ckpt'}", "training.checkpoints.save_interval=1",
        f"output.dir={tmp_path}"]
    ClaudeTrainer.from_config(load_profile("tiny", common)).train()
    other = tmp_path / "other-init"
    seed_everything(99)
    save_model_weights([APTModel(load_profile("tiny", common).model)], other)
    with pytest.raises(CheckpointError, match="reference weights"):
        ClaudeTrainer.from_config(load_profile("tiny", common + [
            f"training.init_from={other}", "training.max_steps=2"]), auto_resume=True)
