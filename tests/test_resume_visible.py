"""Resuming as a new user sees it, through launch/train.py (real runs, 6 tiny steps):

- two fresh identical runs give bit-identical losses on default CPU threading (the documented
  condition: same config and layout);
- ``--resume <dir>/checkpoint-3`` continues in the first run's directory, says "resumed from
  ... at step 3 (consumed samples 24)" (log line and metrics.jsonl record), re-trains steps 4-6
  with the same losses, and metrics.jsonl ends with each step once;
- ``--resume`` of a checkpoint that does not exist: one line naming the path as given and the
  checkpoints that do exist, exit code 2.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.ffn_hidden_size=128", "model.max_seq_len=32",
         "data.seq_length=32", "data.max_corpus_bytes=200000", "training.batch_size=8",
         "training.warmup_steps=2", "training.log_interval=1", "training.eval_interval=0",
         "training.eval_batches=1", "output.sample_tokens=0", "monitoring.plots=false",
         "training.max_steps=6", "training.checkpoints.save_interval=3"]


def _train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--profile", "tiny"]
    for item in SMALL + [f"output.dir={out}"]:
        cmd += ["--set", item]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "OMP_NUM_THREADS")}   # default threading: what a user gets
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(cmd + list(extra), cwd=out.parent, env=env, capture_output=True,
                          text=True, timeout=300)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _run_dir(out: Path) -> Path:
    (run,) = [p for p in out.iterdir() if (p / "metrics.jsonl").exists()]
    return run


def test_fresh_runs_identical_resume_continues_in_the_same_run(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        proc = _train(out)
        assert proc.returncode == 0, proc.stderr[-3000:]
    run = _run_dir(first)
    losses = {r["step"]: r["loss"] for r in _records(run) if "loss" in r}
    again = {r["step"]: r["loss"] for r in _records(_run_dir(second)) if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert again == losses   # bit-identical, not approximately

    checkpoint = first / "tiny-checkpoints" / "checkpoint-3"
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["run_dir"] == str(run)
    proc = _train(first, "--resume", str(checkpoint))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {checkpoint} at step 3 (consumed samples 24)" in proc.stdout
    assert _run_dir(first) == run   # no second run directory
    records = _records(run)
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6], steps   # steps 4-6 once: the stale ones superseded
    assert {r["step"]: r["loss"] for r in records if "loss" in r} == losses
    (resume,) = [r for r in records if "resumed_from" in r]
    assert resume["step"] == 3 and resume["consumed_samples"] == 24
    assert resume["superseded_records"] >= 3 and resume["resumed_from"] == str(checkpoint)

    proc = _train(first, "--resume", str(first / "tiny-checkpoints" / "checkpoint-40"))
    message = [line for line in proc.stderr.splitlines() if line.startswith("apt: error")]
    assert proc.returncode == 2 and len(message) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "tiny-checkpoints/tiny-checkpoints" not in message[0]
    assert f"{first}/tiny-checkpoints/checkpoint-40: no such checkpoint" in message[0]
    assert "checkpoint-6, checkpoint-3" in message[0]


def test_cpu_embedding_backward_is_bit_identical_with_threads():
    """The cause of the fresh-run differences: Megatron's deterministic lookup (weight[ids])
    has a CPU backward that adds rows from several threads in a run-dependent order. The
    repeated backward of one batch must give bit-identical gradients with 2 threads (a few
    steps of a fresh run rarely show it; this does, in most repeats)."""
    import torch
    from apt.core.config import load_profile
    from apt.model.architectures import APTModel
    from apt.trainops.runtime.process_groups import seed_everything, setup_distributed
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        setup_distributed(plan=None)
        seed_everything(0)
        model = APTModel(load_profile("tiny").model)
        g = torch.Generator().manual_seed(0)
        tokens, labels = (torch.randint(0, 258, (32, 128), generator=g) for _ in range(2))
        positions = torch.arange(128).expand(32, 128)
        grads = []
        for _ in range(6):
            model.zero_grad(set_to_none=True)
            model(tokens, positions, None, labels=labels).float().mean().backward()
            grads.append(model.embedding.word_embeddings.weight.grad.clone())
        assert all(torch.equal(grads[0], g) for g in grads[1:])
    finally:
        torch.set_num_threads(threads)
