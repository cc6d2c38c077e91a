"""GPU check of the fused RMSNorm (tools/gpu_check.py, section ``kernels``): builds the CUDA
kernel from source, compares forward and backward with an fp64 eager reference (fp32 and bf16,
a vectorised and an unaligned shape), times fused against eager (CUDA events, medians) and
reports the fraction of the GPU's HBM bandwidth the kernels reach at [16384, 8192] bf16.
``--dry``: the C++ CPU kernel at a small shape, same JSON. The last stdout line is the JSON."""
from __future__ import annotations

import argparse
import sys
import time

import torch

from apt.kernels import _build
from apt.kernels._measure import emit, median_ms, with_hbm_fractions
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="the CPU kernel at a small shape")
    args = parser.parse_args()
    if not args.dry and not torch.cuda.is_available():
        emit({"passed": True, "skipped": "no CUDA"})
        return 0
    device = torch.device("cpu" if args.dry else "cuda")
    start = time.perf_counter()
    _build.load("rmsnorm", device.type)          # builds from source; raises with the reason
    build_s = time.perf_counter() - start
    # vectorised rows and rows that are not a multiple of the vector width
    shapes = [(8, 96), (5, 37)] if args.dry else [(512, 4096), (37, 1001)]
    max_err, eager_err, passed = {}, {}, True
    for dtype in (torch.float32, torch.bfloat16):
        for shape in shapes:
            key = f"{str(dtype).replace('torch.', '')}_{shape[0]}x{shape[1]}"
            max_err[key], eager_err[key] = errors(shape, dtype, device)
            passed &= max_err[key] <= TOL[dtype]
    big = (512, 1024) if args.dry else (16384, 8192)
    result = {"passed": passed, "device": torch.cuda.get_device_name() if device.type == "cuda"
              else "cpu", "build_s": build_s, "max_abs_err": max(max_err.values()),
              "errors": max_err, "eager_errors": eager_err}
    # few repeats in the dry run: it checks that the script works, not the speed
    result.update(timings(5 if args.dry else 20, *big, torch.bfloat16, device))
    if args.dry:
        result["cuda"] = "skipped: dry run on CPU"
    result["seconds"] = time.perf_counter() - start
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
