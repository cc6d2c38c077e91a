"""Fused kernels against their eager paths on CPU: time (forward + backward, median of
interleaved rounds) and peak memory, at several shapes, one table per kernel.

Each kernel is one section: a function that yields result rows, registered in ``SECTIONS``
(add a kernel by writing its ``bench_<name>`` and one entry there). Threads are fixed
(``--threads``, default 1): on a shared machine more threads measure the neighbours.

    python bench/kernels.py [--only rmsnorm,rope] [--threads 1] [--rounds 10] [--clock wall|cpu]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench/kernels_linear_ce.py

import torch  # noqa: E402

from apt.kernels import BUILT as _BUILT, _build  # noqa: E402
from apt.kernels._measure import interleaved_ms, peak_memory_mb  # noqa: E402

DEVICE = torch.device("cpu")
DTYPES = (torch.float32, torch.bfloat16)
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
clock = time.perf_counter


def fwd_bwd(fn: Callable, inputs: list[torch.Tensor], grad: torch.Tensor) -> Callable[[], None]:
    """One training step's worth of the op: forward, then backward into every input."""
    def step():
        leaves = [t.detach().requires_grad_() for t in inputs]
        torch.autograd.grad(fn(*leaves), leaves, grad)
    return step


def compare(label: str, shape, dtype, fused: Callable, eager: Callable, rounds: int) -> dict:
    ms = interleaved_ms({"fused": fused, "eager": eager}, DEVICE, rounds=rounds, clock=clock)
    return {"shape": "x".join(map(str, shape)), "dtype": str(dtype).replace("torch.", ""),
            "what": label, "fused_ms": ms["fused"], "eager_ms": ms["eager"],
            "speedup": ms["eager"] / ms["fused"],
            "fused_peak_mb": peak_memory_mb(fused, DEVICE),
            "eager_peak_mb": peak_memory_mb(eager, DEVICE)}


# -- sections --------------------------------------------------------------------------------
def bench_rmsnorm(rounds: int) -> Iterator[dict]:
    from apt.kernels.rmsnorm import eager_rms_norm, fused_supported, rms_norm
    # [tokens, hidden]: the tiny profile's 8 x 256 tokens at 256, then larger hidden sizes
    for rows, h in ((2048, 256), (4096, 1024), (2048, 4096)):
        for dtype in DTYPES:
            x = torch.randn(rows, h, dtype=dtype)
            w = (1 + 0.1 * torch.randn(h)).to(dtype)
            assert fused_supported(x, w)
            g = torch.randn_like(x)
            yield compare("fwd+bwd", (rows, h), dtype,
                          fwd_bwd(lambda a, b: rms_norm(a, b, 1e-5), [x, w], g),
                          fwd_bwd(lambda a, b: eager_rms_norm(a, b, 1e-5), [x, w], g), rounds)


def bench_rope(rounds: int) -> Iterator[dict]:
    from apt.kernels.rope import apply_rope, eager_apply_rope, fused_supported
    # [s, b, h, d] as Megatron's QKV split leaves it (a strided view); full rotation
    for s, b, h, d in ((256, 8, 4, 64), (1024, 4, 16, 128), (2048, 2, 32, 128)):
        for dtype in DTYPES:
            t = torch.randn(s, b, h, 3 * d, dtype=dtype)[..., :d]
            inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
            ang = torch.arange(s, dtype=torch.float32)[:, None] * inv
            freqs = torch.cat([ang, ang], -1).view(s, 1, 1, d)
            assert fused_supported(t, freqs)
            g = torch.randn(s, b, h, d, dtype=dtype)
            yield compare("fwd+bwd", (s, b, h, d), dtype,
                          fwd_bwd(lambda a: apply_rope(a, freqs), [t], g),
                          fwd_bwd(lambda a: eager_apply_rope(a, freqs), [t], g), rounds)


def bench_swiglu(rounds: int) -> Iterator[dict]:
    from apt.kernels.swiglu import eager_swiglu, fused_supported, swiglu
    # [tokens, 2 x ffn]: the tiny profile's MLP, the peer_hf large shape's, a 7B's
    for rows, f in ((4096, 352), (2048, 1408), (2048, 11008)):
        for dtype in DTYPES:
            y = torch.randn(rows, 2 * f, dtype=dtype)
            assert fused_supported(y)
            g = torch.randn(rows, f, dtype=dtype)
            yield compare("fwd+bwd", (rows, 2 * f), dtype, fwd_bwd(swiglu, [y], g),
                          fwd_bwd(eager_swiglu, [y], g), rounds)


def bench_linear(rounds: int) -> Iterator[dict]:
    """oneDNN's GEMMs (forward, input gradient; the weight gradient is mm on both sides)
    against F.linear (MKL's sgemm on CPU), fp32: the peer_hf shapes' fc1 and fc2."""
    import torch.nn.functional as F
    from apt.kernels.linear import linear, supported
    for tokens, n_in, n_out in ((4096, 128, 704), (4096, 352, 128), (2048, 256, 1280),
                                (2048, 512, 2816), (2048, 1408, 512)):
        x = torch.randn(tokens, n_in)
        w = torch.randn(n_out, n_in) / n_in ** 0.5
        assert supported(x, w)
        g = torch.randn(tokens, n_out)
        yield compare("fwd+bwd", (tokens, n_in, n_out), torch.float32,
                      fwd_bwd(linear, [x, w], g), fwd_bwd(F.linear, [x, w], g), rounds)


def bench_linear_cross_entropy(rounds: int) -> Iterator[dict]:
    """32k and 128k vocabularies (bench/kernels_linear_ce.py has more shapes and an RSS
    cross-check of the memory)."""
    import kernels_linear_ce
    yield from kernels_linear_ce.bench_linear_cross_entropy(rounds, kernels_linear_ce.QUICK)


SECTIONS: dict[str, Callable[[int], Iterator[dict]]] = {
    "rmsnorm": bench_rmsnorm,
    "rope": bench_rope,
    "swiglu": bench_swiglu,
    "linear": bench_linear,
    "linear_cross_entropy": bench_linear_cross_entropy,
}


def print_table(name: str, rows: list[dict]) -> None:
    print(f"\n## {name}")
    print(f"{'shape':>16} {'dtype':>9} {'what':>8} {'fused ms':>9} {'eager ms':>9} "
          f"{'speedup':>7} {'fused MB':>9} {'eager MB':>9}")
    for r in rows:
        print(f"{r['shape']:>16} {r['dtype']:>9} {r['what']:>8} {r['fused_ms']:9.3f} "
              f"{r['eager_ms']:9.3f} {r['speedup']:6.2f}x {r['fused_peak_mb']:9.1f} "
              f"{r['eager_peak_mb']:9.1f}"
              + (f"  logits part {r['logits_part_ratio']:.1f}x less" if "logits_part_ratio" in r
                 else ""), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections (default: all of {', '.join(SECTIONS)})")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="cpu: this thread's CPU time (with --threads 1 on a loaded machine, "
                             "where wall time measures the neighbours)")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu counts one thread: use it with --threads 1")
    global clock
    clock = CLOCKS[args.clock]
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# bench/kernels.py: CPU, {args.threads} thread(s), {args.clock} clock, median of "
          f"{args.rounds} interleaved rounds; peak MB = memory allocated during one fwd+bwd")
    for name in names:
        if name in _BUILT:
            _build.load(name, "cpu")   # build (or load) outside the timed region
        print_table(name, list(SECTIONS[name](args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
