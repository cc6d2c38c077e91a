"""RMSNorm: ``y = x / sqrt(mean(x^2) + eps) * weight`` over the last dimension."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._autograd import needs_autograd
from ._build import available, load

# What the fused kernels take; anything else (mixed x / weight dtypes, fp16 on CPU, a weight
# that is not [h], double backward) runs eager. The CUDA kernel keeps a row's columns in
# registers, up to 16384 of them (kernels/rmsnorm/rmsnorm_cuda.cu).
FUSED_DTYPES = {"cpu": (torch.float32, torch.bfloat16),
                "cuda": (torch.float32, torch.bfloat16, torch.float16)}
CUDA_MAX_HIDDEN = 16384


def eager_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def fused_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``rms_norm(x, weight, eps)`` runs the fused kernel (it is built for the device
    and takes these tensors)."""
    device = x.device.type
    return (x.dtype in FUSED_DTYPES.get(device, ()) and weight.dtype == x.dtype
            and weight.device == x.device and weight.dim() == 1 and x.dim() >= 1
            and weight.shape[0] == x.shape[-1] and x.numel() > 0
            and (device != "cuda" or x.shape[-1] <= CUDA_MAX_HIDDEN)
            and available("rmsnorm", device))


class _FusedRMSNorm(torch.autograd.Function):
    """Forward and backward in the kernel; saves x and the per-row 1/rms (fp32), not y."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        ops = load("rmsnorm", x.device.type)
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        y, rstd = ops.forward(rows, weight.contiguous(), float(eps))
        ctx.save_for_backward(rows, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        rows, weight, rstd = ctx.saved_tensors
        ops = load("rmsnorm", rows.device.type)
        dx, dweight = ops.backward(dy.reshape(rows.shape).contiguous(), rows,
                                   weight.contiguous(), rstd)
        return dx.view(ctx.shape), dweight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of ``x`` [..., h] with ``weight`` [h], differentiable in both. The fused kernel
    computes in fp32 and rounds once (eager rounds the normalised value before the weight)."""
    if fused_supported(x, weight):
        if not needs_autograd(x, weight):
            rows = x.reshape(-1, x.shape[-1]).contiguous()
            return load("rmsnorm", x.device.type).forward(
                rows, weight.contiguous(), float(eps))[0].view(x.shape)
        return _FusedRMSNorm.apply(x, weight, eps)
    return eager_rms_norm(x, weight, eps)
