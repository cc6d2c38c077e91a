"""SwiGLU: ``silu(a) * b`` for ``y = [a | b]``, the two halves of the last dimension (the
layout of Megatron's gated fc1 output on every tensor-parallel rank)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._autograd import needs_autograd
from ._build import available, load

# What the fused kernels take; anything else (fp16 on CPU, an odd last dimension, double
# backward) runs eager.
FUSED_DTYPES = {"cpu": (torch.float32, torch.bfloat16),
                "cuda": (torch.float32, torch.bfloat16, torch.float16)}


def eager_swiglu(y: torch.Tensor) -> torch.Tensor:
    a, b = torch.chunk(y, 2, dim=-1)
    return F.silu(a) * b


def fused_supported(y: torch.Tensor) -> bool:
    """Whether ``swiglu(y)`` runs the fused kernel (built for the device, takes ``y``)."""
    device = y.device.type
    return (y.dtype in FUSED_DTYPES.get(device, ()) and y.dim() >= 1 and y.numel() > 0
            and y.shape[-1] % 2 == 0 and available("swiglu", device))


class _FusedSwiGLU(torch.autograd.Function):
    """Forward and backward in the kernel; saves y only (eager keeps y's halves and silu(a))."""

    @staticmethod
    def forward(ctx, y):
        ops = load("swiglu", y.device.type)
        rows = y.reshape(-1, y.shape[-1]).contiguous()
        ctx.save_for_backward(rows)
        ctx.shape = y.shape
        return ops.forward(rows).view(*y.shape[:-1], y.shape[-1] // 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        ops = load("swiglu", rows.device.type)
        g = grad.reshape(rows.shape[0], rows.shape[1] // 2).contiguous()
        return ops.backward(g, rows).view(ctx.shape)


def swiglu(y: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` of ``y = [a | b]`` [..., 2f] -> [..., f], differentiable. The fused
    kernel computes in fp32 and rounds once per stored value."""
    if fused_supported(y):
        if not needs_autograd(y):
            rows = y.reshape(-1, y.shape[-1]).contiguous()
            return load("swiglu", y.device.type).forward(rows).view(
                *y.shape[:-1], y.shape[-1] // 2)
        return _FusedSwiGLU.apply(y)
    return eager_swiglu(y)


class SwiGLU(torch.nn.Module):
    """The activation module Megatron's MLP calls on its whole fc1 output when the layer spec
    gives one (``MLPSubmodules.activation_func`` with ``use_te_activation_func``): the place
    that receives ``[gate | up]`` before it is split, so the kernel can write the gradient of
    both halves in place of eager's chunk + cat."""

    def __init__(self, config=None):
        super().__init__()

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return swiglu(y)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None) -> dict:
        return {}   # no parameters (Megatron asks every child of the MLP for its shards)
