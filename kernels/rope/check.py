"""GPU check of the fused RoPE (tools/gpu_check.py, section ``kernels``): builds the CUDA kernel
from source, compares forward and backward with an fp64 eager reference (fp32 and bf16; a
QKV-split view with Megatron's tables, and an unaligned shape with per-row tables and a partial
rotation), times fused against eager (CUDA events, medians) and reports the fraction of the
GPU's HBM bandwidth reached at [4096, 8, 32, 128] bf16. ``--dry``: the C++ CPU kernel at a
small shape, same JSON. The last stdout line is the JSON."""
from __future__ import annotations

import functools
import sys

import torch

from apt.kernels import _build
from apt.kernels._measure import accuracy, dtype_name, median_ms, run_check, with_hbm_fractions
from apt.kernels.rope import apply_rope, eager_apply_rope, fused_supported

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}   # max abs error against fp64, unit-scale data


def megatron_freqs(s, fb, d_rot, device):
    """Megatron's RotaryEmbedding table (rotate_half layout): [s, fb, 1, d_rot] fp32 angles;
    per-row tables (fb > 1) start each row at another position, as packed documents do."""
    inv = 1.0 / (10000 ** (torch.arange(0, d_rot, 2, dtype=torch.float32, device=device) / d_rot))
    pos = (torch.arange(s, dtype=torch.float32, device=device).view(s, 1)
           + 37 * torch.arange(fb, dtype=torch.float32, device=device).view(1, fb))
    angles = pos[..., None] * inv
    return torch.cat([angles, angles], dim=-1).view(s, fb, 1, d_rot)


def errors(s, b, h, d, d_rot, fb, interleaved, dtype, device) -> tuple[float, float]:
    """Max abs error of the fused and of the eager path against fp64 (output and dt)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    qkv0 = torch.randn(s, b, h, 3 * d, generator=gen).to(device)
    g0 = torch.randn(s, b, h, d, generator=gen).to(device)
    freqs = megatron_freqs(s, fb, d_rot, device)

    def run(fn, dt):
        t = qkv0.to(dtype).to(dt)[..., d:2 * d].detach().requires_grad_()   # a strided view
        y = fn(t, freqs.to(torch.float64) if dt == torch.float64 else freqs, interleaved)
        y.backward(g0.to(dtype).to(dt))
        return [y.detach().double(), t.grad.double()]

    probe = qkv0.to(dtype)[..., d:2 * d]
    assert fused_supported(probe, freqs), "the fused kernel is not used"
    ref = run(eager_apply_rope, torch.float64)
    fused = run(apply_rope, dtype)
    eager = run(eager_apply_rope, dtype)
    err = lambda got: max((a - b).abs().max().item() for a, b in zip(got, ref))
    return err(fused), err(eager)


def timings(repeats, s, b, h, d, dtype, device) -> dict:
    qkv = torch.randn(s, b, h, 3 * d, device=device, dtype=dtype)
    t = qkv[..., :d]                       # the layout Megatron hands to RoPE
    freqs = megatron_freqs(s, 1, d, device)
    dy = torch.randn(s, b, h, d, device=device, dtype=dtype)
    ops = _build.load("rope", device.type)
    fwd_ms = median_ms(lambda: ops.apply(t, freqs, False, False), device, repeats)
    bwd_ms = median_ms(lambda: ops.apply(dy, freqs, False, True), device, repeats)

    def step(fn):
        tr = t.detach().requires_grad_()
        torch.autograd.grad(fn(tr, freqs), (tr,), dy)

    ms = median_ms(lambda: step(apply_rope), device, repeats)
    eager_ms = median_ms(lambda: step(eager_apply_rope), device, repeats)
    # one read and one write of t per direction; the angle table is s*d fp32 per direction
    moved = 2 * t.numel() * t.element_size() + freqs.numel() * 4 * 3
    out = {"shape": [s, b, h, d], "dtype": str(dtype).replace("torch.", ""), "ms": ms,
           "eager_ms": eager_ms, "speedup": eager_ms / ms, "fwd_kernel_ms": fwd_ms,
           "bwd_kernel_ms": bwd_ms, "fwd_gb_per_s": moved / (fwd_ms * 1e-3) / 1e9,
           "bwd_gb_per_s": moved / (bwd_ms * 1e-3) / 1e9,
           "gb_per_s": 2 * moved / ((fwd_ms + bwd_ms) * 1e-3) / 1e9}
    return with_hbm_fractions(out, device)


def _case_name(dtype, s, b, h, d, d_rot, freq_rows, interleaved) -> str:
    return (f"{dtype_name(dtype)}_{s}x{b}x{h}x{d}_rot{d_rot}_fb{freq_rows}"
            + ("_interleaved" if interleaved else ""))


def check(device, dry: bool) -> dict:
    # (s, b, h, d, d_rot, freqs rows, interleaved): Megatron's layout, no vector width
    # anywhere (per-row tables, partial rotation), interleaved pairs
    cases = [(16, 2, 4, 64, 64, 1, False), (9, 3, 7, 10, 6, 3, False),
             (8, 2, 3, 32, 16, 1, True)] if dry else \
        [(512, 2, 16, 128, 128, 1, False), (33, 3, 7, 10, 6, 3, False),
         (64, 2, 8, 64, 32, 2, True)]
    result = accuracy({_case_name(dtype, *case):
                       (dtype, functools.partial(errors, *case, dtype, device))
                       for dtype in (torch.float32, torch.bfloat16) for case in cases}, TOL)
    big = (64, 2, 8, 128) if dry else (4096, 8, 32, 128)
    # few repeats in the dry run: it checks that the script works, not the speed
    result.update(timings(5 if dry else 20, *big, torch.bfloat16, device))
    return result


if __name__ == "__main__":
    sys.exit(run_check("rope", __doc__.splitlines()[0], check))
