"""Checkpoint I/O: how long training stalls for an asynchronous save against a synchronous
save of the same state, and save/load throughput against the disk's own write speed.

One process trains a mid-size APTModel (about 40M parameters by default, so model plus AdamW
state is about 0.6 GiB) with the real Trainer pieces (DeepSpeed engine, CheckpointManager), then:

1. disk: writes a file of the checkpoint's size in 8 MiB blocks and fsyncs it (MiB/s);
2. sync: ``Trainer.save_checkpoint`` with ``async_save=False``, timed until committed;
3. async: the same save with ``async_save=True``: the stall (until the loop may go on), training
   steps while the writer runs, then the commit. Step times during the write are compared with
   steps without one (the writer shares the CPU with training here; on a GPU node it does not);
4. load: verify (SHA-256 of every file) plus model weights and optimizer state, MiB/s.

    python bench/checkpoint_io.py [--hidden 768 --layers 6 --repeats 3 --dir /tmp/apt-bench]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apt.core.logging import configure_logging  # noqa: E402

configure_logging()

from apt.core.config import load_profile, with_overrides  # noqa: E402
from apt.trainops.checkpoints import load_model_weights  # noqa: E402
from apt.trainops.checkpoints.optimizer_state import load_optimizer_state  # noqa: E402
from apt.trainops.distributed.engines import build_engine  # noqa: E402
from apt.trainops.trainers import Trainer  # noqa: E402

MIB = 2 ** 20


def disk_write_speed(directory: Path, size: int) -> float:
    """MiB/s writing ``size`` bytes in 8 MiB blocks, fsync included (what a checkpoint needs)."""
    block = os.urandom(8 * MIB)
    path = directory / "disk-speed.bin"
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for _ in range(max(1, size // len(block))):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    written = max(1, size // len(block)) * len(block)
    path.unlink()
    return written / MIB / seconds


def build(args, directory: Path):
    cfg = with_overrides(load_profile("tiny"), {
        "model.hidden_size": args.hidden, "model.num_layers": args.layers,
        "model.num_attention_heads": args.hidden // 64, "model.num_query_groups": args.hidden // 64,
        "model.ffn_hidden_size": args.hidden * 8 // 3 // 64 * 64, "model.max_seq_len": 64,
        "data.seq_length": 64, "training.batch_size": 2, "training.max_steps": 10_000,
        "training.checkpoints.save_interval": 0, "training.checkpoints.keep_last_n": 2,
        "output.dir": str(directory / "runs")})
    trainer = Trainer.from_config(cfg, checkpoint_dir=str(directory / "checkpoints"))
    trainer.artifacts = trainer._artifacts()   # a save records the run directory
    trainer.engine = build_engine(trainer.modules, cfg, trainer.plan, trainer.objective)
    return trainer, trainer.training_batches()


def step(trainer, batches) -> float:
    start = time.perf_counter()
    trainer.engine.train_step(batches, 1e-4)
    trainer.step += 1
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    directory = Path(args.dir or tempfile.mkdtemp(prefix="apt-ckpt-bench-"))
    directory.mkdir(parents=True, exist_ok=True)
    trainer, batches = build(args, directory)
    manager = trainer.checkpoints
    params = sum(p.numel() for m in trainer.modules for p in m.parameters())
    base = [step(trainer, batches) for _ in range(4)][1:]   # the first step warms up

    sync, committed = [], None
    manager.async_save = False
    for _ in range(args.repeats):
        step(trainer, batches)
        start = time.perf_counter()
        committed = trainer.save_checkpoint().committed
        sync.append(time.perf_counter() - start)
    size = manager.last_save["bytes"]

    manager.async_save = True
    stalls, totals, during, steps_during = [], [], [], []
    for _ in range(args.repeats):
        step(trainer, batches)
        start = time.perf_counter()
        stalls.append(trainer.save_checkpoint().stall_s)
        n = 0
        while manager.writing_in_background():
            during.append(step(trainer, batches))
            n += 1
        committed = manager.wait()
        totals.append(time.perf_counter() - start)
        steps_during.append(n)
        base += [step(trainer, batches) for _ in range(2)]

    loads = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        state = manager.load(committed)          # verifies size and SHA-256 of every file
        verified = time.perf_counter() - start
        load_model_weights(trainer.modules, state.path / "model")
        load_optimizer_state(trainer.engine, state.path / "optimizer")
        loads.append((time.perf_counter() - start, verified))
    disk = disk_write_speed(directory, size)

    med = statistics.median
    print(f"state: {params / 1e6:.1f}M parameters, checkpoint {size / MIB:.0f} MiB "
          f"(weights + fp32 master + 2 Adam moments), 1 process, {directory}")
    print(f"disk write (8 MiB blocks + fsync, {size / MIB:.0f} MiB): {disk:.0f} MiB/s")
    print(f"sync save  : {med(sync):.2f} s median of {[round(s, 2) for s in sync]} "
          f"-> {size / MIB / med(sync):.0f} MiB/s ({size / MIB / med(sync) / disk:.0%} of disk)")
    print(f"async save : loop stalled {med(stalls):.3f} s median of "
          f"{[round(s, 3) for s in stalls]} ({med(stalls) / med(sync):.1%} of the sync save); "
          f"committed after {med(totals):.2f} s while {med(steps_during):.0f} steps ran")
    if during:
        print(f"step time  : {med(base) * 1000:.0f} ms without a write, {med(during) * 1000:.0f} "
              f"ms while writing (+{med(during) / med(base) - 1:.0%}; 2 shared CPU cores)")
    total_load = med(t for t, _ in loads)
    print(f"load       : {total_load:.2f} s -> {size / MIB / total_load:.0f} MiB/s "
          f"(of which verify {med(v for _, v in loads):.2f} s; files likely in page cache)")
    if not args.dir:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
