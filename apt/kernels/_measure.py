"""Timing and bandwidth helpers shared by the kernels' GPU checks (``kernels/<name>/check.py``)
and ``bench/kernels.py``, and the frame those checks run in (``run_check``)."""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch

# Peak HBM bandwidth by device name (vendor figures, TB/s). The first matching entry wins,
# so the more specific names come first.
HBM_PEAK_TB_S = (
    (("H200",), 4.8),
    (("H100", "PCIe"), 2.0),
    (("H100",), 3.35),          # SXM
    (("A100", "80GB"), 2.0),
    (("A100",), 1.555),         # 40GB
)


def hbm_peak_gb_s(device_name: str) -> float | None:
    for words, tb_s in HBM_PEAK_TB_S:
        if all(w.lower() in device_name.lower() for w in words):
            return tb_s * 1000.0
    return None


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int = 20,
              warmup: int = 3, clock: Callable[[], float] = time.perf_counter) -> float:
    """Median time of ``fn()`` in milliseconds: CUDA events on a GPU (each repeat timed on the
    stream), ``clock`` otherwise (wall time; ``time.thread_time`` counts only this thread's
    CPU time, which a one-thread run on a loaded machine needs)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            start = clock()
            fn()
            times.append((clock() - start) * 1e3)
    return statistics.median(times)


def interleaved_ms(fns: dict[str, Callable[[], object]], device: torch.device,
                   rounds: int = 10, warmup: int = 2,
                   clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median milliseconds of each of ``fns``, timed in interleaved rounds (one call of each
    per round), so that a load change on a shared machine hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(median_ms(fn, device, repeats=1, warmup=0, clock=clock))
    return {name: statistics.median(t) for name, t in times.items()}


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory allocated while ``fn()`` runs, above what was allocated before, in MB:
    the CUDA caching allocator's counter on a GPU; on CPU, torch's allocations and frees
    replayed from the profiler's memory events (Python's tracemalloc does not see them)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The allocator's own "[memory]" events (bytes allocated > 0, freed < 0) replayed in time
    # order. Not the ops' *self* memory: an op's self figure nets its frees against its own
    # start time, before the allocations they free (it under-counted the unfused
    # cross-entropy's peak by a third).
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak / 2 ** 20


def with_hbm_fractions(out: dict, device: torch.device) -> dict:
    """``out`` plus, on a GPU, the HBM peak and the fraction of it that each ``*gb_per_s``
    figure (``fwd_``, ``bwd_``, both) reaches."""
    if device.type == "cuda":
        peak = hbm_peak_gb_s(torch.cuda.get_device_name(device))
        out["hbm_peak_gb_s"] = peak
        for key in ("fwd_", "bwd_", ""):
            out[f"{key}hbm_fraction"] = out[f"{key}gb_per_s"] / peak if peak else None
    return out


def emit(result: dict) -> None:
    """The check's one JSON object, as the last line of stdout (tools/gpu_check.py reads it)."""
    print(json.dumps(result, default=float), flush=True)


def accuracy(cases: dict, tolerance: dict) -> dict:
    """``cases``: name -> (dtype, a function returning the fused and the eager path's largest
    error against the reference). Passed when every fused error is within tolerance[dtype]."""
    fused, eager, passed = {}, {}, True
    for name, (dtype, measure) in cases.items():
        fused[name], eager[name] = measure()
        passed &= fused[name] <= tolerance[dtype]
    return {"passed": passed, "max_abs_err": max(fused.values()), "errors": fused,
            "eager_errors": eager}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def run_check(kernel: str, description: str,
              body: Callable[[torch.device, bool], dict]) -> int:
    """What every ``kernels/<name>/check.py`` does around its own comparisons and timings.

    ``--dry`` runs the C++ CPU kernel at small shapes (it shows that the script works, not how
    fast anything is); without ``--dry`` and without CUDA it reports a skip. Otherwise it
    builds ``kernel`` from source (timed: ``build_s``), adds ``body(device, dry)``'s results
    (which say ``passed``) and prints one JSON object as the last stdout line whatever happens
    (an exception becomes ``error``). Returns the exit code: 1 unless passed."""
    from apt.kernels import _build
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--dry", action="store_true", help="the CPU kernel at small shapes")
    dry = parser.parse_args().dry
    if not dry and not torch.cuda.is_available():
        emit({"passed": True, "skipped": "no CUDA"})
        return 0
    device = torch.device("cpu" if dry else "cuda")
    result = {"passed": False,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    start = time.perf_counter()
    try:
        _build.load(kernel, device.type)   # builds from source; raises with the reason
        result["build_s"] = time.perf_counter() - start
        result.update(body(device, dry))
    except Exception as exc:   # one JSON line whatever happens: gpu_check records it
        first = (str(exc).strip().splitlines() or [""])[0]
        result.update(passed=False, error=f"{type(exc).__name__}: {first}")
    if dry:
        result["cuda"] = "skipped: dry run on CPU"
    result["seconds"] = time.perf_counter() - start
    emit(result)
    return 0 if result["passed"] else 1


__all__ = ["accuracy", "dtype_name", "emit", "hbm_peak_gb_s", "interleaved_ms", "median_ms",
           "peak_memory_mb", "run_check", "with_hbm_fractions"]
