"""Rotary position embeddings with Megatron-core's layout and semantics."""
from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from ._autograd import needs_autograd
from ._build import available, load

# What the fused kernels take; anything else (fp16 on CPU, a freqs table that broadcasts over
# s or needs a gradient, an odd d_rot, a strided last dimension) runs eager.
FUSED_DTYPES = {"cpu": (torch.float32, torch.bfloat16),
                "cuda": (torch.float32, torch.bfloat16, torch.float16)}


def eager_apply_rope(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False):
    return _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=interleaved)


def fused_supported(t: torch.Tensor, freqs: torch.Tensor) -> bool:
    """Whether ``apply_rope(t, freqs, ...)`` runs the fused kernel."""
    device = t.device.type
    if t.dtype not in FUSED_DTYPES.get(device, ()) or t.dim() != 4 or freqs.dim() != 4:
        return False
    s, b, _, d = t.shape
    d_rot = freqs.shape[-1]
    return (freqs.dtype == torch.float32 and freqs.device == t.device
            and not freqs.requires_grad and freqs.shape[0] == s
            and freqs.shape[1] in (1, b) and freqs.shape[2] == 1
            and 0 < d_rot <= d and d_rot % 2 == 0 and t.numel() > 0
            and available("rope", device))


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The kernels take any strides over s, b, h (the QKV split's views) but a unit stride
    # over d; only a tensor without one is copied.
    return t if t.stride(-1) == 1 else t.contiguous()


class _FusedRope(torch.autograd.Function):
    """Forward and backward (the transposed rotation) in the kernel; saves only freqs."""

    @staticmethod
    def forward(ctx, t, freqs, interleaved):
        freqs = freqs.contiguous()
        ctx.save_for_backward(freqs)
        ctx.interleaved = interleaved
        return load("rope", t.device.type).apply(_last_dim_contiguous(t), freqs, interleaved,
                                                 False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        (freqs,) = ctx.saved_tensors
        dt = load("rope", dy.device.type).apply(_last_dim_contiguous(dy), freqs,
                                                ctx.interleaved, True)
        return dt, None, None


def apply_rope(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """``t`` [s, b, h, d] rotated by the table ``freqs`` [s, 1 or b, 1, d_rot] (fp32 angles,
    Megatron's ``RotaryEmbedding`` output; per-row tables for packed documents); channels
    past ``d_rot`` pass through. The signature of Megatron's ``fused_apply_rotary_pos_emb``.
    The fused kernel computes in fp32 and rounds once (eager rounds cos/sin to t's dtype)."""
    if fused_supported(t, freqs):
        if not needs_autograd(t):
            return load("rope", t.device.type).apply(_last_dim_contiguous(t), freqs.contiguous(),
                                                     bool(interleaved), False)
        return _FusedRope.apply(t, freqs, bool(interleaved))
    return eager_apply_rope(t, freqs, interleaved)
