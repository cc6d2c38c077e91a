"""GPU check of the fused SwiGLU (tools/gpu_check.py, section ``kernels``): builds the CUDA
kernel from source, compares forward and backward with an fp64 eager reference (fp32 and bf16,
a vectorised and an unaligned shape), times fused against eager (CUDA events, medians) and
reports the fraction of the GPU's HBM bandwidth the kernels reach at [16384, 2 x 7168] bf16
(a Llama-70B fc1 output on one rank of TP 4). ``--dry``: the C++ CPU kernel at a small shape, same
JSON. The last stdout line is the JSON."""
from __future__ import annotations

import functools
import sys

import torch

from apt.kernels import _build
from apt.kernels._measure import accuracy, dtype_name, median_ms, run_check, with_hbm_fractions
from apt.kernels.swiglu import eager_swiglu, fused_supported, swiglu

TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}   # max abs error against fp64, |y| up to ~4


def errors(shape, dtype, device) -> tuple[float, float]:
    """Max abs error of the fused and of the eager path against fp64 (out, dy)."""
    rows, width = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    y0 = torch.randn(rows, width, generator=gen).to(device)
    g0 = torch.randn(rows, width // 2, generator=gen).to(device)

    def run(fn, dt):
        y = y0.to(dtype).to(dt).clone().requires_grad_()   # a leaf of its own per run
        out = fn(y)
        out.backward(g0.to(dtype).to(dt))
        return [t.detach().double() for t in (out, y.grad)]

    assert fused_supported(y0.to(dtype)), "the fused kernel is not used"
    ref = run(eager_swiglu, torch.float64)
    fused = run(swiglu, dtype)
    eager = run(eager_swiglu, dtype)
    err = lambda got: max((a - b).abs().max().item() for a, b in zip(got, ref))
    return err(fused), err(eager)


def timings(repeats, rows, f, dtype, device) -> dict:
    y = torch.randn(rows, 2 * f, device=device, dtype=dtype)
    g = torch.randn(rows, f, device=device, dtype=dtype)
    ops = _build.load("swiglu", device.type)
    fwd_ms = median_ms(lambda: ops.forward(y), device, repeats)
    bwd_ms = median_ms(lambda: ops.backward(g, y), device, repeats)

    def step(fn):
        yr = y.detach().requires_grad_()
        torch.autograd.grad(fn(yr), (yr,), g)

    ms = median_ms(lambda: step(swiglu), device, repeats)
    eager_ms = median_ms(lambda: step(eager_swiglu), device, repeats)
    size = y.element_size()
    fwd_bytes = 3 * rows * f * size            # y in (2f), out (f)
    bwd_bytes = 5 * rows * f * size            # g (f) and y (2f) in, dy (2f) out
    gb_per_s = (fwd_bytes + bwd_bytes) / ((fwd_ms + bwd_ms) * 1e-3) / 1e9
    out = {"shape": [rows, 2 * f], "dtype": dtype_name(dtype), "ms": ms,
           "eager_ms": eager_ms, "speedup": eager_ms / ms, "fwd_kernel_ms": fwd_ms,
           "bwd_kernel_ms": bwd_ms, "fwd_gb_per_s": fwd_bytes / (fwd_ms * 1e-3) / 1e9,
           "bwd_gb_per_s": bwd_bytes / (bwd_ms * 1e-3) / 1e9, "gb_per_s": gb_per_s}
    return with_hbm_fractions(out, device)


def check(device, dry: bool) -> dict:
    # vectorised rows and rows that are not a multiple of the vector width
    shapes = [(8, 96), (5, 74)] if dry else [(512, 8192), (37, 2002)]
    result = accuracy({f"{dtype_name(dtype)}_{rows}x{width}":
                       (dtype, functools.partial(errors, (rows, width), dtype, device))
                       for dtype in (torch.float32, torch.bfloat16) for rows, width in shapes},
                      TOL)
    big = (512, 1024) if dry else (16384, 7168)
    # few repeats in the dry run: it checks that the script works, not the speed
    result.update(timings(5 if dry else 20, *big, torch.bfloat16, device))
    return result


if __name__ == "__main__":
    sys.exit(run_check("swiglu", __doc__.splitlines()[0], check))
