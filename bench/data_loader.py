"""Data pipeline throughput: preprocessing, loader tokens/s per process, resume cost.

1. ``trainops preprocess`` of the Python standard library's sources (byte tokenizer, 2 workers).
2. The loader over that ``.bin`` (memory-mapped) at the tiny profile's shape (micro-batch 32 x
   128 tokens, one process, no worker processes): tokens/s, plain, with per-document position
   resets, and blended over two files; compared with what the tiny model consumes.
3. Time from ``create_dataloader(consumed_samples=N)`` to the first batch, at N = 10 and
   N = 10,000,000, on a 20M-sample dataset (a sparse 5 GB file, so no disk is used), for the
   ``full`` per-epoch permutation and the ``feistel`` order.

    python bench/data_loader.py [--model-tokens-per-s 16000]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from apt.core.config import load_profile  # noqa: E402
from apt.trainops.data import TokenDataset, create_dataloader  # noqa: E402
from apt.trainops.data.build import build_datasets  # noqa: E402
from apt.trainops.data.sources.preprocess import format_summary, preprocess  # noqa: E402


def loader_tokens_per_s(dataset, micro=32, batches=300) -> float:
    loader = create_dataloader(dataset, micro, seed=1, data_parallel_rank=0,
                               data_parallel_size=1)
    it = iter(loader)
    for _ in range(10):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    seconds = time.perf_counter() - start
    return batches * batch["tokens"].numel() / seconds


def resume_seconds(dataset, consumed: int, permutation: str, global_batch=10) -> float:
    start = time.perf_counter()
    loader = create_dataloader(dataset, global_batch, seed=1, data_parallel_rank=0,
                               data_parallel_size=1, consumed_samples=consumed,
                               permutation=permutation)
    next(iter(loader))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-tokens-per-s", type=float, default=16000)
    args = parser.parse_args()
    import sysconfig
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(sysconfig.get_paths()["stdlib"])
        inputs = [str(src / d) for d in ("email", "json", "asyncio", "concurrent", "logging",
                                         "xml", "http", "unittest", "importlib", "multiprocessing")]
        summary = preprocess(inputs, f"{tmp}/stdlib", workers=2, progress=False)
        print("preprocess |", format_summary(summary).replace(tmp, "<tmp>"))
        summary2 = preprocess([str(src / "email")], f"{tmp}/email", workers=1, progress=False)
        base = ["data.corpus=indexed", "data.split=98,2,0"]
        train, _, _ = build_datasets(load_profile("tiny", base + [f"data.path={tmp}/stdlib"]).data)
        reset, _, _ = build_datasets(load_profile("tiny", base + [
            f"data.path={tmp}/stdlib", "data.reset_position_ids=true"]).data)
        blend, _, _ = build_datasets(load_profile("tiny", base + [
            f"data.blend=[[0.7, {tmp}/stdlib], [0.3, {tmp}/email]]"]).data)
        for name, ds in (("plain", train), ("reset_position_ids", reset), ("blend 0.7/0.3", blend)):
            rate = loader_tokens_per_s(ds)
            print(f"loader     | {name:20s} {len(ds):>8,} samples  {rate:>12,.0f} tokens/s per "
                  f"process = {rate / args.model_tokens_per_s:,.0f}x the tiny model's "
                  f"{args.model_tokens_per_s:,.0f} tokens/s")
        sparse = Path(tmp) / "sparse.bin"
        samples, seq = 20_000_000, 128
        with open(sparse, "wb") as f:
            f.truncate((samples * seq + 1) * 2)       # sparse: reads as zeros, no disk used
        big = TokenDataset(np.memmap(sparse, dtype=np.uint16, mode="r"), seq, "sparse")
        for permutation in ("full", "feistel"):
            for consumed in (10, 10_000_000):
                t = resume_seconds(big, consumed, permutation)
                print(f"resume     | {permutation:8s} {len(big):,} samples, at sample "
                      f"{consumed:>10,}: {t * 1000:8.1f} ms to the first batch")
        os.unlink(sparse)
    del summary2


if __name__ == "__main__":
    main()
