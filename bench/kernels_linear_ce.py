"""The fused linear + cross-entropy against the unfused path on CPU: time and peak memory of one
forward + backward, at vocabularies 32k and 128k.

Unfused = what the output layer does without the kernel: ``logits = hidden @ W^T``, fp32
logits, cross-entropy (``eager_linear_cross_entropy``), backward through both. Fused =
``linear_cross_entropy`` (blocks of logits, online logsumexp, recomputed in backward).

Time: median of interleaved rounds (one fused and one unfused call per round), fixed threads.
Memory: every allocation and free of torch's CPU allocator during one forward + backward,
replayed in order from ``torch.profiler`` memory events; the peak above what was allocated
before (the CPU analogue of ``torch.cuda.max_memory_allocated``). It does not see oneDNN's
own scratch buffers (both paths use the same matmuls). ``logits part`` = peak minus the
gradients of hidden and weight, which both paths must return. ``--rss`` adds a cross-check
that sees everything: each path's growth of peak RSS (VmHWM) in a fresh process.

A section of bench/kernels.py (``bench_linear_cross_entropy`` yields its rows; ``section``
prints them), and a script of its own:

    python bench/kernels_linear_ce.py [--threads 1] [--rounds 3] [--quick | --shapes ...] [--rss]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from apt.kernels._measure import interleaved_ms, peak_memory_mb  # noqa: E402

CPU = torch.device("cpu")

# (tokens, hidden, vocab, dtype): the 32k and 128k vocabularies of Llama 2 / Llama 3.
SHAPES = [(2048, 256, 32000, torch.float32), (4096, 512, 32000, torch.float32),
          (2048, 256, 32000, torch.bfloat16), (2048, 256, 128256, torch.float32),
          (4096, 256, 128256, torch.float32)]
QUICK = [(2048, 256, 32000, torch.float32), (2048, 256, 128256, torch.float32)]


def step(fn: Callable, hidden, weight, labels) -> Callable[[], None]:
    """One forward + backward into hidden and weight (mean loss)."""
    def run():
        h = hidden.detach().requires_grad_()
        w = weight.detach().requires_grad_()
        torch.autograd.grad(fn(h, w, labels).mean(), [h, w])
    return run


def rss_peak_mib(path: str, tokens: int, hidden_size: int, vocab: int, dtype) -> float:
    """Cross-check that sees every allocation (oneDNN's too; Linux only): a fresh process makes
    the inputs, warms the kernels up at a small shape, resets its peak resident set (VmHWM,
    /proc/self/clear_refs) and runs one forward + backward; the peak's growth over the resident
    set before."""
    import subprocess
    code = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
torch.set_num_threads({torch.get_num_threads()})
from apt.kernels.linear_cross_entropy import linear_cross_entropy, eager_linear_cross_entropy
fn = {{"fused": linear_cross_entropy, "eager": eager_linear_cross_entropy}}[{path!r}]
dtype = getattr(torch, {str(dtype).replace("torch.", "")!r})
def step(n, v):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, {hidden_size}, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, {hidden_size}, generator=g) * 0.05).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    return lambda: torch.autograd.grad(fn(h, w, y).mean(), [h, w])
step(64, 1000)()
run = step({tokens}, {vocab})
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")   # resets the peak (VmHWM) to the current resident set
before = status("VmRSS")
run()
print((status("VmHWM") - before) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench_linear_cross_entropy(rounds: int, shapes=SHAPES, rss_check: bool = False
                               ) -> Iterator[dict]:
    from apt.kernels.linear_cross_entropy import (eager_linear_cross_entropy, fused_kernel,
                                                  linear_cross_entropy)
    for tokens, hidden_size, vocab, dtype in shapes:
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(tokens, hidden_size, generator=g).to(dtype)
        weight = (torch.randn(vocab, hidden_size, generator=g) * hidden_size ** -0.5).to(dtype)
        labels = torch.randint(0, vocab, (tokens,), generator=g)
        assert fused_kernel(hidden) is not None, "the CPU kernel did not build"
        fused = step(linear_cross_entropy, hidden, weight, labels)
        eager = step(eager_linear_cross_entropy, hidden, weight, labels)
        ms = interleaved_ms({"fused": fused, "eager": eager}, CPU, rounds=rounds, warmup=1)
        grads = (hidden.numel() + weight.numel()) * hidden.element_size() / 2 ** 20
        fused_peak, eager_peak = peak_memory_mb(fused, CPU), peak_memory_mb(eager, CPU)
        rss = {p: rss_peak_mib(p, tokens, hidden_size, vocab, dtype) for p in ("fused", "eager")} \
            if rss_check else {}
        yield {"shape": f"{tokens}x{hidden_size}x{vocab}",
               "dtype": str(dtype).replace("torch.", ""), "what": "fwd+bwd",
               "fused_ms": ms["fused"], "eager_ms": ms["eager"],
               "speedup": ms["eager"] / ms["fused"],
               "fused_peak_mb": fused_peak, "eager_peak_mb": eager_peak,
               "grads_mb": grads,
               "logits_part_ratio": (eager_peak - grads) / max(fused_peak - grads, 1e-9),
               "fused_rss_mb": rss.get("fused"), "eager_rss_mb": rss.get("eager")}


HEADER = (f"{'tokens x H x V':>18} {'dtype':>9} {'fused ms':>9} {'eager ms':>9} {'speedup':>7} "
          f"{'fused MiB':>9} {'eager MiB':>9} {'grads MiB':>9} {'logits part':>11} "
          f"{'fused RSS':>9} {'eager RSS':>9}")


def print_row(r: dict) -> None:
    print(f"{r['shape']:>18} {r['dtype']:>9} {r['fused_ms']:9.1f} {r['eager_ms']:9.1f} "
          f"{r['speedup']:6.2f}x {r['fused_peak_mb']:9.1f} {r['eager_peak_mb']:9.1f} "
          f"{r['grads_mb']:9.1f} {r['logits_part_ratio']:10.1f}x "
          f"{_mib(r['fused_rss_mb'])} {_mib(r['eager_rss_mb'])}", flush=True)


def _mib(value) -> str:
    return f"{'-':>9}" if value is None else f"{value:9.1f}"


def section(args) -> list[dict]:
    """The linear_cross_entropy section: ``args.rounds``, ``args.threads`` (set by the caller
    or here), ``args.quick`` (two shapes only) or ``args.shapes``, ``args.rss`` (the RSS
    cross-check)."""
    from apt.kernels import load
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    load("linear_cross_entropy", "cpu")   # build (or load) outside the timed region
    print(f"\n## linear_cross_entropy (CPU, {torch.get_num_threads()} thread(s), median of "
          f"{args.rounds} interleaved rounds; MiB = peak of torch's CPU allocator in one "
          f"fwd+bwd; logits part = (peak - grads) unfused / fused)")
    print(HEADER)
    rows = []
    shapes = getattr(args, "shapes", None) or (QUICK if getattr(args, "quick", False)
                                               else SHAPES)
    for row in bench_linear_cross_entropy(args.rounds, shapes,
                                          rss_check=getattr(args, "rss", False)):
        rows.append(row)
        print_row(row)
    return rows


def _shapes(text: str) -> list:
    shapes = []
    for item in text.split(","):
        dims, _, dtype = item.partition(":")
        tokens, hidden_size, vocab = (int(d) for d in dims.split("x"))
        shapes.append((tokens, hidden_size, vocab, getattr(torch, dtype or "float32")))
    return shapes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="two shapes (32k and 128k)")
    parser.add_argument("--shapes", type=_shapes, help="tokens x hidden x vocab : dtype, "
                        "comma-separated, e.g. 2048x256x128256:float32 (instead of the list)")
    parser.add_argument("--rss", action="store_true",
                        help="also each path's peak RSS growth in a fresh process (Linux)")
    section(parser.parse_args())
    return 0


if __name__ == "__main__":
    sys.exit(main())
