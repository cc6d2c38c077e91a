"""GPU check of the fused RMSNorm (tools/gpu_check.py, section ``kernels``): builds the CUDA
kernel from source, compares forward and backward with an fp64 eager reference (fp32 and bf16,
a vectorised and an unaligned shape), times fused against eager (CUDA events, medians) and
reports the fraction of the GPU's HBM bandwidth the kernels reach at [16384, 8192] bf16.
``--dry``: the C++ CPU kernel at a small shape, same JSON. The last stdout line is the JSON."""
from __future__ import annotations

import functools
import sys

import torch

from apt.kernels import _build
from apt.kernels._measure import accuracy, dtype_name, median_ms, run_check, with_hbm_fractions
from apt.kernels.rmsnorm import eager_rms_norm, fused_supported, rms_norm

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}   # max abs error against fp64, unit-scale data
EPS = 1e-5


def errors(shape, dtype, device) -> tuple[float, float]:
    """Max abs error of the fused and of the eager path against fp64 (y, dx, dweight)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(*shape, generator=gen).to(device)
    w0 = (1 + 0.3 * torch.randn(shape[-1], generator=gen)).to(device)
    g0 = torch.randn(*shape, generator=gen).to(device)

    def run(fn, dt):
        x = x0.to(dtype).to(dt).clone().requires_grad_()   # a leaf of its own per run
        w = w0.to(dtype).to(dt).clone().requires_grad_()
        y = fn(x, w, EPS)
        y.backward(g0.to(dtype).to(dt))
        return [t.detach().double() for t in (y, x.grad, w.grad / shape[0])]

    assert fused_supported(x0.to(dtype), w0.to(dtype)), "the fused kernel is not used"
    ref = run(eager_rms_norm, torch.float64)
    fused = run(rms_norm, dtype)
    eager = run(eager_rms_norm, dtype)
    err = lambda got: max((a - b).abs().max().item() for a, b in zip(got, ref))
    return err(fused), err(eager)


def timings(repeats, rows, h, dtype, device) -> dict:
    x = torch.randn(rows, h, device=device, dtype=dtype)
    w = torch.ones(h, device=device, dtype=dtype)
    dy = torch.randn_like(x)
    ops = _build.load("rmsnorm", device.type)
    _, rstd = ops.forward(x, w, EPS)
    fwd_ms = median_ms(lambda: ops.forward(x, w, EPS), device, repeats)
    bwd_ms = median_ms(lambda: ops.backward(dy, x, w, rstd), device, repeats)

    def step(fn):
        xr = x.detach().requires_grad_()
        wr = w.detach().requires_grad_()
        torch.autograd.grad(fn(xr, wr, EPS), (xr, wr), dy)

    ms = median_ms(lambda: step(rms_norm), device, repeats)
    eager_ms = median_ms(lambda: step(eager_rms_norm), device, repeats)
    size = x.element_size()
    fwd_bytes = 2 * x.numel() * size + h * size + rows * 4            # x in, y out, w, rstd
    bwd_bytes = 3 * x.numel() * size + h * size + rows * 4            # x, dy in, dx out
    gb_per_s = (fwd_bytes + bwd_bytes) / ((fwd_ms + bwd_ms) * 1e-3) / 1e9
    out = {"shape": [rows, h], "dtype": str(dtype).replace("torch.", ""), "ms": ms,
           "eager_ms": eager_ms, "speedup": eager_ms / ms, "fwd_kernel_ms": fwd_ms,
           "bwd_kernel_ms": bwd_ms, "fwd_gb_per_s": fwd_bytes / (fwd_ms * 1e-3) / 1e9,
           "bwd_gb_per_s": bwd_bytes / (bwd_ms * 1e-3) / 1e9, "gb_per_s": gb_per_s}
    return with_hbm_fractions(out, device)


def check(device, dry: bool) -> dict:
    # vectorised rows and rows that are not a multiple of the vector width
    shapes = [(8, 96), (5, 37)] if dry else [(512, 4096), (37, 1001)]
    result = accuracy({f"{dtype_name(dtype)}_{rows}x{h}":
                       (dtype, functools.partial(errors, (rows, h), dtype, device))
                       for dtype in (torch.float32, torch.bfloat16) for rows, h in shapes}, TOL)
    big = (512, 1024) if dry else (16384, 8192)
    # few repeats in the dry run: it checks that the script works, not the speed
    result.update(timings(5 if dry else 20, *big, torch.bfloat16, device))
    return result


if __name__ == "__main__":
    sys.exit(run_check("rmsnorm", __doc__.splitlines()[0], check))
