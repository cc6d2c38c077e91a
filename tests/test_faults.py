"""Faults injected into real 2-process runs (gloo, CPU), under both engines: a NaN loss on one
rank under each anomaly policy, a loss spike, a rank stalled inside a step (the watchdog), a
rank SIGKILLed under torchrun --max-restarts (elastic restart + auto-resume). The faults come
from the test-only hook APT_FAULT_INJECT (apt/trainops/reliability/faults.py)."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apt.core.config import load_profile
from apt.trainops.reliability.anomaly import AnomalyGuard
from tests._launch import run_distributed

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "workers" / "fault_anomaly.py"
TRAIN = REPO / "launch" / "train.py"
SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.ffn_hidden_size=128", "model.max_seq_len=32",
         "data.seq_length=32", "data.max_corpus_bytes=200000", "training.batch_size=4",
         "training.warmup_steps=1", "training.log_interval=1", "training.eval_interval=0",
         "training.eval_batches=1", "output.sample_tokens=0"]
ENGINES = {"deepspeed": ["training.distributed.strategy=ddp"],
           "megatron": ["training.distributed.strategy=hybrid",
                        "training.distributed.engine=megatron"]}
NAN = "nan:rank=1:batch=3"
# The runs of every test here (the clean run is the SIGKILL test's uninterrupted reference).
RUN = ["training.max_steps=8", "training.checkpoints.save_interval=2",
       "training.checkpoints.auto_resume=true"]


def test_spike_zscore_over_the_window():
    guard = AnomalyGuard(load_profile("tiny", ["training.anomaly.spike_zscore=4",
                                               "training.anomaly.window=3"]).training.anomaly)
    for loss in (2.0, 2.1, 1.9):
        assert guard.classify(loss, 1.0) is None   # the window fills first
        guard.record(loss, None)
    assert guard.classify(2.2, 1.0) is None        # z = 2
    assert "spike" in guard.classify(2.5, 1.0)     # z = 5
    assert "non-finite gradient norm" in guard.classify(2.0, float("inf"))
    assert "non-finite loss" in guard.classify(float("nan"), 1.0)


@pytest.fixture(scope="module")
def nan_runs(tmp_path_factory):
    """Per engine: a clean run and the same run with rank 1's loss NaN on the 3rd batch under
    skip (then a save of a NaN weight), rewind and stop; on DeepSpeed a x50 loss spike under
    skip too (the guard's decision does not depend on the engine)."""
    tmp = tmp_path_factory.mktemp("faults")
    runs = {}
    for engine, layout in ENGINES.items():
        for name, fault, extra in (
                ("clean", None, []), ("skip", NAN, ["training.anomaly.policy=skip"]),
                ("rewind", NAN, ["training.anomaly.policy=rewind"]),
                ("stop", NAN, ["training.anomaly.policy=stop"]),
                ("spike", "spike:rank=1:batch=3:factor=50",
                 ["training.anomaly.spike_zscore=6", "training.anomaly.window=2"])):
            if name == "spike" and engine != "deepspeed":
                continue
            # checkpoints only where the policy needs them (they do not change any number)
            saves = [] if name == "rewind" else ["training.checkpoints.save_interval=0"]
            runs[f"{engine}/{name}"] = {
                "fault": fault, "poison_save": name == "skip",
                "set": layout + extra + saves + [f"output.dir={tmp / engine / name}"]}
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"common": SMALL + RUN, "runs": runs}))
    out = tmp / "out.json"
    run_distributed(WORKER, 2, ["--spec", str(spec), "--out", str(out)], timeout=600)
    return json.loads(out.read_text())


@pytest.mark.parametrize("engine", list(ENGINES))
def test_nan_on_one_rank_each_policy_on_every_rank(nan_runs, engine):
    clean = nan_runs[f"{engine}/clean"][0]
    assert clean["engine"] == engine and clean["anomalies"] == 0 and clean["adam_steps"] == 8
    for name in ("skip", "rewind", "stop", "spike"):
        ranks = nan_runs.get(f"{engine}/{name}")
        if ranks is None:
            continue
        # every rank decided the same, and every rank's weights are finite
        assert len({json.dumps({k: r[k] for k in ("anomalies", "adam_steps", "step", "steps")})
                    for r in ranks}) == 1, (name, ranks)
        assert all(r["finite"] and r["anomalies"] == 1 for r in ranks), (name, ranks)
    skip = nan_runs[f"{engine}/skip"][0]
    assert skip["steps"] == list(range(1, 9)) and math.isnan(skip["losses"][2])
    assert skip["losses"][:2] == clean["losses"][:2]
    assert skip["adam_steps"] == 7                  # the NaN step updated nothing
    assert skip["digests"] == clean["digests"]      # the data cursor moved on as usual
    assert all("not finite" in r["poisoned_save"] for r in nan_runs[f"{engine}/skip"])

    rewind = nan_runs[f"{engine}/rewind"][0]
    assert rewind["steps"] == list(range(1, 9)) and rewind["adam_steps"] == 8
    assert rewind["losses"][:2] == clean["losses"][:2]
    # back at checkpoint-2, batch 3 skipped: its step 3 is the skip run's step 4 (same
    # weights: the step-2 ones, same batch 4), bit for bit
    assert rewind["digests"][2:4] == clean["digests"][3:5]
    assert rewind["losses"][2] == skip["losses"][3]

    for r in nan_runs[f"{engine}/stop"]:
        assert r["step"] == 3 and r["adam_steps"] == 2 and "policy is stop" in r["stopped"]

    if engine == "deepspeed":
        spike = nan_runs[f"{engine}/spike"][0]
        assert spike["adam_steps"] == 7 and spike["losses"][2] > 20 * clean["losses"][2]
        assert spike["losses"][3] == skip["losses"][3]  # skipped like the NaN


def _env(fault=None):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "APT_FAULT_INJECT")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    if fault:
        env["APT_FAULT_INJECT"] = fault
    return env


def _torchrun(overrides, fault=None, restarts=0, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node=2", f"--max-restarts={restarts}", str(TRAIN), "--profile", "tiny"]
    for item in SMALL + overrides:
        cmd += ["--set", item]
    start = time.monotonic()
    # Its own process group: whatever happens, nothing outlives the test.
    proc = subprocess.Popen(cmd, env=_env(fault), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"still running after {timeout} s: {out[-2000:]}{err[-4000:]}")
    return proc.returncode, out, err, time.monotonic() - start


@pytest.mark.parametrize("engine", list(ENGINES))
def test_rank_stalled_inside_a_step_is_named_and_the_job_exits(tmp_path, engine):
    code, out, err, seconds = _torchrun(
        ENGINES[engine] + ["training.max_steps=6", "training.watchdog.timeout_s=8",
                           "training.watchdog.heartbeat_s=1",
                           "training.watchdog.startup_timeout_s=300", f"output.dir={tmp_path}"],
        fault="stall:rank=1:step=3:phase=forward:seconds=600")
    assert code != 0, out[-2000:] + err[-4000:]
    lines = [line for line in err.splitlines() if line.startswith("watchdog | rank")]
    reports = [line for line in lines if "no progress" in line]
    # the ranks report (the first to exit may end the job before the other prints: seen on a
    # loaded CI machine), and every report names rank 1 stalled in step 3's forward pass
    assert reports, err[-4000:]
    assert all("stalled: rank 1 (step 3, phase forward" in line for line in reports), reports
    assert "Python stacks" in err and "faults.py" in err   # the stalled frame is in the dump
    # named within 60 s of the stall (the report says how long the rank made no progress);
    # the whole job, start-up included, exits instead of hanging
    stuck = [float(re.search(r"no progress for (\d+) s", line).group(1)) for line in reports]
    assert max(stuck) < 60, reports
    assert seconds < 300, seconds


@pytest.mark.parametrize("engine", list(ENGINES))
def test_rank_sigkilled_under_max_restarts_resumes_with_the_same_losses(nan_runs, tmp_path,
                                                                        engine):
    """The uninterrupted reference is the clean run of nan_runs: the same config on the same
    layout, and fresh runs are bit-identical (docs/checkpoints.md)."""
    code, out, err, _ = _torchrun(ENGINES[engine] + RUN + [f"output.dir={tmp_path}"],
                                  fault="kill:rank=1:step=6:phase=backward:restart=0",
                                  restarts=1)
    assert code == 0, out[-2000:] + err[-4000:]
    assert "resumed from" in out and "Traceback" not in out

    (run,) = [p for p in tmp_path.iterdir() if (p / "metrics.jsonl").exists()]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    got = {r["step"]: r["loss"] for r in records if "loss" in r}
    expected = nan_runs[f"{engine}/clean"][0]["losses"]
    assert sorted(got) == list(range(1, 9)) and [got[s] for s in sorted(got)] == expected
    (resume,) = [r for r in records if "resumed_from" in r]
    assert resume["step"] in (2, 4)   # the last checkpoint committed before the kill at step 6
