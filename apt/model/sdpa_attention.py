"""Core attention of the local spec through ``torch.nn.functional.scaled_dot_product_attention``.

Megatron's local ``DotProductAttention`` materialises the scores: ``baddbmm`` into a [b*n, s, s]
buffer, a causal mask built anew on every layer and every step (``torch.ones`` + ``triu``),
``masked_fill``, softmax, ``bmm``, and the same tensors again in backward. SDPA does the same
maths in one fused kernel (on CPU a flash-attention kernel that never holds [s, s] per head),
which is what Hugging Face's Llama uses by default. Measured on CPU at the FEASIBILITY shape
(bench/peer_hf.py), this is one of the places where APT's step lost to the HF Trainer.

``SDPAttention`` is a ``DotProductAttention``: same constructor, same heads per TP partition,
same softmax scale, same layouts (q/k/v [s, b, heads, d] in, [s, b, heads * d] out), and
``isinstance`` checks (packed documents: ``PackedDocumentsGPTModel._why_unsupported``) still
hold. It honours a given bool mask [b, 1, s, s] (True = masked, Megatron's convention) in place
of the causal one, exactly as the parent's torch softmax path does. Cases the parent handles and
this path would not reproduce exactly (attention dropout, which draws from Megatron's RNG
tracker; off-by-one / learnable softmax; query-key layer scaling; packed THD
params; an attention bias) go to the parent unchanged. One difference remains by design: a
row whose every key is masked (which APT's block-diagonal causal masks never produce: a token
always sees itself) averages all values in the parent (masked scores are set to -10000) and
is not defined for SDPA.

Sliding-window attention (``config.window_size`` = (left, right), Megatron's convention: query
i sees keys i - left .. i + right; APT sets (W - 1, 0)) is a banded causal mask here, combined
with a given document mask. The parent's own window mask is built on CUDA only.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

Tensor = torch.Tensor


class SDPAttention(DotProductAttention):
    """``DotProductAttention`` computed by ``F.scaled_dot_product_attention``."""

    def _parent_needed(self, query: Tensor, key: Tensor, attention_bias, packed_seq_params) -> bool:
        cfg = self.config
        return (packed_seq_params is not None or attention_bias is not None
                or self.softmax_offset is not None
                or cfg.apply_query_key_layer_scaling
                or (self.training and self.attention_dropout.p > 0)
                # the parent's causal mask is for self-attention only (it asserts sq == sk)
                or (query.size(0) != key.size(0) and query.size(0) > 1))

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                attention_mask: Optional[Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[Tensor] = None, packed_seq_params=None) -> Tensor:
        if self._parent_needed(query, key, attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias, packed_seq_params)
        sq, b = query.size(0), query.size(1)
        # [s, b, heads, d] -> [b, heads, s, d]: views; SDPA reads strided inputs.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        # Grouped-query attention inside SDPA: query head i reads key/value group i // groups,
        # as the parent's repeat_interleave does, without materialising the repeated k and v
        # or summing their gradients back per group (what HF's Llama does too; issue 14: the
        # repeat and the larger attention backward were ~4 ms of a 270 ms tiny-profile step).
        gqa = self.num_attention_heads_per_partition > self.num_query_groups_per_partition
        # The parent ignores the forward's attn_mask_type and uses its own (causal for GPT);
        # a given mask replaces the causal one; one query (decoding) needs no causal mask.
        causal = self.attn_mask_type == AttnMaskType.causal and sq > 1
        window = self.scale_mask_softmax.window_size
        if window is not None:
            allowed = window_band(sq, key.size(0), window, query.device)
            if attention_mask is not None:
                allowed = allowed & ~attention_mask
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                                 scale=self.softmax_scale, enable_gqa=gqa)
        elif attention_mask is not None:
            # SDPA's bool mask is True where attention is allowed: Megatron's is the opposite.
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask,
                                                 scale=self.softmax_scale, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                 scale=self.softmax_scale, enable_gqa=gqa)
        # [b, heads, s, d] -> [s, b, heads * d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)


def window_band(sq: int, sk: int, window: tuple[int, int], device) -> Tensor:
    """[sq, sk] bool, True where query i (the last sq of sk positions) may see key j:
    i - left <= j <= i + right (Megatron's ``get_sliding_window_causal_mask``, on any device)."""
    left, right = window
    i = torch.arange(sk - sq, sk, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    allowed = j <= i + right if right >= 0 else torch.ones(sq, sk, dtype=torch.bool, device=device)
    if left >= 0:
        allowed = allowed & (j >= i - left)
    return allowed
