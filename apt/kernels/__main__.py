"""Build every fused kernel for this machine now, instead of at a model's first use.

    python -m apt.kernels [--device cpu|cuda] [--jobs N]

Each kernel is its own extension, so they build side by side in separate processes (a GPU
node's cores compile three CUDA bindings at once; the GPU check does this before it times
anything). Prints one line per kernel; exits 1 when one did not build.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch


def _build_one(name: str, device: str) -> tuple[str, float, str | None]:
    from apt.kernels._build import KernelUnavailable, load
    start = time.perf_counter()
    try:
        load(name, device)
    except KernelUnavailable as err:
        return name, time.perf_counter() - start, str(err)
    return name, time.perf_counter() - start, None


def main(argv=None) -> int:
    from apt.kernels import BUILT
    parser = argparse.ArgumentParser(prog="python -m apt.kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--jobs", type=int, default=max(1, min(len(BUILT),
                                                             (os.cpu_count() or 2) // 4)))
    args = parser.parse_args(argv)
    failed = 0
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for name, seconds, problem in pool.map(_build_one, BUILT, [args.device] * len(BUILT)):
            failed += problem is not None
            print(f"{name:22s} {args.device:4s} {'unavailable: ' + problem if problem else 'ready'}"
                  f" ({seconds:.1f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
