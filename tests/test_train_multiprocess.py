"""Real multi-process training through the launchers, against a one-process reference.

Each launch runs launch/train.py end to end (DeepSpeed engine over Megatron-core groups, gloo):
per-step losses with the same global batch must match the single-process run within 1e-5.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from apt.trainops.distributed.launcher_env import free_port

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
STEPS = 5
COMMON = ["--profile", "tiny", "--set", f"training.max_steps={STEPS}",
          "--set", "training.warmup_steps=2", "--set", "training.batch_size=8",
          "--set", "training.log_interval=1", "--set", "training.eval_interval=0",
          "--set", "training.eval_batches=2", "--set", "output.sample_tokens=0",
          "--set", "data.max_corpus_bytes=400000"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # An in-process Trainer earlier in this pytest process exported its own rendezvous (and
    # still holds that port): a launched run must not inherit it.
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _losses(output_dir: Path) -> list[float]:
    (run,) = list(output_dir.iterdir())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def _run(cmd, label):
    result = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{label} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    _run([sys.executable, str(TRAIN), *COMMON, "--set", f"output.dir={out}",
          "--set", "training.distributed.zero_stage=0"], "single process")
    losses = _losses(out)
    assert len(losses) == STEPS and losses[-1] < losses[0]
    return losses


def test_deepspeed_launcher_two_processes_zero2_matches_single(reference, tmp_path):
    deepspeed = Path(sys.executable).parent / "deepspeed"
    result = _run([str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()),
                   str(TRAIN), *COMMON, "--set", f"output.dir={tmp_path}",
                   "--set", "training.distributed.zero_stage=2"], "deepspeed --num_gpus 2")
    assert "DP=2" in result.stdout and "ZeRO-2" in result.stdout
    losses = _losses(tmp_path)
    assert max(abs(a - b) for a, b in zip(reference, losses)) < 1e-5, (reference, losses)


def test_torchrun_two_processes_zero3_matches_single(reference, tmp_path):
    result = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node=2", str(TRAIN), *COMMON, "--set", f"output.dir={tmp_path}",
                   "--set", "training.distributed.strategy=fsdp",
                   "--set", "monitoring.tensorboard=true"], "torchrun --nproc_per_node 2")
    assert "fsdp" in result.stdout and "ZeRO-3" in result.stdout
    losses = _losses(tmp_path)
    assert max(abs(a - b) for a, b in zip(reference, losses)) < 1e-5, (reference, losses)
    # Only rank 0 writes: one run directory, one TensorBoard event file, one plot set.
    (run,) = list(tmp_path.iterdir())
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert (run / "plots" / "loss.png").exists() and (run / "environment.json").exists()
