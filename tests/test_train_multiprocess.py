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

from apt.trainops.runtime.launcher_env import free_port

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


def _run_together(commands, envs, label):
    """Start every process of a multi-node launch at once; all must succeed."""
    procs = [subprocess.Popen(cmd, env={**_env(), **extra}, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for cmd, extra in zip(commands, envs)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, f"{label} failed:\n{out[-3000:]}\n{err[-5000:]}"
    return outputs[0][0]


def test_torchrun_two_nodes_zero3_matches_single(reference, tmp_path):
    port = str(free_port())
    commands = [[sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                 "--nproc_per_node=1", f"--node_rank={node}", "--master_addr=127.0.0.1",
                 f"--master_port={port}", str(TRAIN), *COMMON, "--set", f"output.dir={tmp_path}",
                 "--set", "training.distributed.strategy=fsdp", "--set", "monitoring.tensorboard=true"]
                for node in (0, 1)]
    stdout = _run_together(commands, [{}, {}], "torchrun --nnodes 2")
    assert "fsdp" in stdout and "ZeRO-3" in stdout and "2 = 1 node(s)" not in stdout
    losses = _losses(tmp_path)
    assert max(abs(a - b) for a, b in zip(reference, losses)) < 1e-5, (reference, losses)
    # Only rank 0 writes: one run directory, one TensorBoard event file, one plot set.
    (run,) = list(tmp_path.iterdir())
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert (run / "plots" / "loss.png").exists() and (run / "environment.json").exists()


def test_deepspeed_hostfile_matches_single(reference, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=2\n")
    deepspeed = Path(sys.executable).parent / "deepspeed"
    out = tmp_path / "runs"
    _run([str(deepspeed), "--hostfile", str(hostfile), "--no_ssh_check", "--master_addr",
          "127.0.0.1", "--master_port", str(free_port()), str(TRAIN), *COMMON,
          "--set", f"output.dir={out}"], "deepspeed --hostfile")
    losses = _losses(out)
    assert max(abs(a - b) for a, b in zip(reference, losses)) < 1e-5, (reference, losses)


def test_slurm_tasks_tensor_parallel_matches_single(reference, tmp_path):
    """What srun gives each task (SLURM_PROCID/NTASKS/LOCALID + the sbatch's MASTER_*)."""
    port = str(free_port())
    envs = [{"SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r),
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port} for r in (0, 1)]
    command = [sys.executable, str(TRAIN), *COMMON, "--set", f"output.dir={tmp_path}",
               "--set", "training.distributed.strategy=hybrid",
               "--set", "training.distributed.tensor_parallel=2",
               "--set", "training.distributed.sequence_parallel=true"]
    stdout = _run_together([command, command], envs, "SLURM tasks")
    assert "TP=2" in stdout and "engine megatron" in stdout
    losses = _losses(tmp_path)
    assert max(abs(a - b) for a, b in zip(reference, losses)) < 1e-5, (reference, losses)
