"""Rotary position embeddings with Megatron-core's layout and semantics."""
from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd


def eager_apply_rope(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False):
    return _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=interleaved)


def apply_rope(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """``t`` [s, b, h, d] rotated by the table ``freqs`` [s, 1 or b, 1, d_rot] (fp32 angles,
    Megatron's ``RotaryEmbedding`` output; per-row tables for packed documents); channels
    past ``d_rot`` pass through. The signature of Megatron's ``fused_apply_rotary_pos_emb``."""
    return eager_apply_rope(t, freqs, interleaved)
