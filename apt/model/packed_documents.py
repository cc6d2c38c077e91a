"""A ``GPTModel`` that honours the document structure of packed rows.

Several documents packed into one row need two things the stock ``GPTModel`` does not do:

- per-document positions in RoPE: Megatron computes the rotary table from the sequence length
  only (``RotaryEmbedding.forward(seq_len)``) and ignores ``position_ids``. Here, when the
  positions are not plain ``0..s-1``, the table is gathered per row from ``position_ids``:
  ``[s, b, 1, d]`` instead of ``[s, 1, 1, d]``; the unfused bshd RoPE
  (``_apply_rotary_pos_emb_bshd``) broadcasts it against q/k ``[s, b, h, d]`` unchanged.
  Plain positions keep Megatron's own (cached) table, so results are bit-identical to the
  stock model.
- a block-diagonal causal ``attention_mask`` [b, 1, s, s] (bool, True = masked): the local
  spec's ``DotProductAttention`` applies a given mask in place of its causal one (torch softmax
  path), on every layer of every pipeline stage (each stage gets the mask in its forward call),
  after sequence parallelism's all-gather (attention sees the whole sequence) and inside
  selective and full recompute (both forward the mask). Transformer Engine's causal attention
  ignores an arbitrary mask, so a TE model refuses one.

``supported_batch_fields`` says which optional batch fields a model honours; a field it cannot
honour is refused with an error, never dropped.
"""
from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.dot_product_attention import DotProductAttention

from .fused_output import FusedOutputLossGPTModel
from .sdpa_attention import SDPAttention

Tensor = torch.Tensor


def counts_from_zero(position_ids: Tensor) -> bool:
    """True when every row is 0..s-1 (the positions Megatron's RoPE assumes)."""
    s = position_ids.shape[-1]
    arange = torch.arange(s, device=position_ids.device, dtype=position_ids.dtype)
    return torch.equal(position_ids, arange.expand_as(position_ids))


def rotary_table_at(rotary: RotaryEmbedding, position_ids: Tensor) -> Tensor:
    """Megatron's rotary table ``[s, b, 1, dim]`` for per-row positions ``[b, s]``.

    Mirrors ``RotaryEmbedding.get_freqs_non_repeated`` / ``get_emb`` with ``position_ids`` in
    place of ``arange(s)`` (the same float products, so a row 0..s-1 gives the same values)."""
    positions = position_ids.to(device=rotary.inv_freq.device, dtype=rotary.inv_freq.dtype)
    if rotary.seq_len_interpolation_factor is not None:
        positions = positions * (1 / rotary.seq_len_interpolation_factor)
    freqs = positions.transpose(0, 1)[..., None] * rotary.inv_freq  # [s, b, dim/2]
    if rotary.rotary_interleaved:
        table = torch.stack((freqs, freqs), dim=-1).flatten(-2)
    else:
        table = torch.cat((freqs, freqs), dim=-1)
    return table[:, :, None, :]


def _core_attentions(model: GPTModel) -> list:
    return [getattr(getattr(layer, "self_attention", None), "core_attention", None)
            for layer in model.decoder.layers]


class PackedDocumentsGPTModel(FusedOutputLossGPTModel):
    """``GPTModel`` whose forward honours per-row ``position_ids`` and a document mask."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._refusals = self._why_unsupported()

    @property
    def supported_batch_fields(self) -> frozenset[str]:
        """Optional ``LMBatch`` fields this model honours (see ``require_supported``)."""
        return frozenset({"position_ids", "attention_mask"} - set(self._refusals))

    def _why_unsupported(self) -> dict[str, str]:
        cfg, why = self.config, {}
        if cfg.context_parallel_size > 1:
            # Context parallelism slices the sequence before the model sees it; neither the
            # per-row rotary table nor a [s, s] mask is sliced to match.
            why["position_ids"] = why["attention_mask"] = "context parallelism (CP > 1)"
            return why
        if self.position_embedding_type != "rope" or cfg.multi_latent_attention:
            why["position_ids"] = f"position embedding {self.position_embedding_type!r}"
        elif cfg.apply_rope_fusion and "rope" not in self.kernels:
            # APT's RoPE kernel takes per-row tables [s, b, 1, d]; TE's fused RoPE does not.
            why["position_ids"] = "fused RoPE (apply_rope_fusion) takes one table for all rows"
        attentions = _core_attentions(self)
        foreign = [a for a in attentions if not isinstance(a, DotProductAttention)]
        if foreign:
            why["attention_mask"] = (
                f"{type(foreign[0]).__name__} applies its own causal mask and ignores a given "
                "one (Transformer Engine's packed THD path is not implemented)")
        elif cfg.masked_softmax_fusion:
            why["attention_mask"] = "the fused causal softmax kernel ignores a given mask"
        elif cfg.window_size is not None and not all(isinstance(a, SDPAttention)
                                                     for a in attentions):
            # SDPAttention combines the window with a given mask; Megatron's replaces it.
            why["attention_mask"] = "sliding-window attention replaces a given mask"
        return why

    def _refuse(self, field: str) -> None:
        raise ValueError(
            f"{type(self).__name__} cannot honour the batch's {field}: "
            f"{self._refusals[field]}; use data without it (data.reset_attention_mask / "
            f"data.reset_position_ids / SFT packing off) or the local spec without Transformer "
            f"Engine")

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor,
                *args, **kwargs):
        if position_ids is not None:
            if input_ids is not None and position_ids.shape[-1] != input_ids.shape[-1]:
                raise ValueError(f"position_ids {tuple(position_ids.shape)} do not match "
                                 f"input_ids {tuple(input_ids.shape)}")
            if "position_ids" in self._refusals and not counts_from_zero(position_ids):
                self._refuse("position_ids")
        if attention_mask is not None:
            if "attention_mask" in self._refusals:
                self._refuse("attention_mask")
            attention_mask = self._causal(attention_mask)
        return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)

    @staticmethod
    def _causal(mask: Tensor) -> Tensor:
        """The mask with the future masked too: a given mask replaces the causal one inside
        DotProductAttention, so a mask that forgot causality would let tokens see ahead.
        With a KV cache the mask is [b, 1, sq, sk]: the sq queries are the last sq of the sk
        keys (sq = 1 when decoding one token, which sees every earlier key)."""
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 \
                or mask.shape[2] > mask.shape[3]:
            raise ValueError(f"attention_mask must be bool [b, 1, s, s] (True = masked), got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        sq, sk = mask.shape[-2:]
        if sq == 1:
            return mask
        future = torch.ones(sq, sk, dtype=torch.bool, device=mask.device).triu(sk - sq + 1)
        return mask | future

    def _preprocess(self, input_ids: Tensor, position_ids: Tensor, **kwargs):
        out = super()._preprocess(input_ids=input_ids, position_ids=position_ids, **kwargs)
        table = out[1]
        context = kwargs.get("inference_context")
        if context is not None and table is not None and position_ids is not None:
            return (out[0], self._cached_rows_table(context, position_ids, table), *out[2:])
        if (table is None or position_ids is None or kwargs.get("packed_seq_params") is not None
                or context is not None or counts_from_zero(position_ids)):
            return out  # Megatron's own table
        rows = position_ids if position_ids.dim() == 2 else position_ids.view(1, -1)
        per_row = rotary_table_at(self.rotary_pos_emb, rows)
        if per_row.shape[0] != table.shape[0]:
            raise ValueError(f"position_ids cover {per_row.shape[0]} tokens, the sequence has "
                             f"{table.shape[0]}")
        return (out[0], per_row, *out[2:])

    def _cached_rows_table(self, context, position_ids: Tensor, table: Tensor) -> Tensor:
        """The rotary table of a KV-cached pass whose rows do not start at cache slot 0.

        Megatron's static inference context places token t of the cache at position t: its
        attention takes rows [offset, offset + s) of the table for the queries and those of
        the keys (rotated_key_cache.py). Rows aligned at their end (left padding: the RL
        sampler) give row b's cache slot t the position t - shift[b], shift = offset + s - 1 -
        position_ids[:, -1] (the last token is never padding); the table here covers every
        slot of the cache per row, [max_len, b, 1, d], so Megatron's slicing stays as it is.
        Padded slots (negative positions, clamped to 0) are masked by the caller. One table
        per generation: the shifts do not change from pass to pass, so it is kept on the
        context."""
        if not context.is_static_batching():
            return table
        rows = position_ids if position_ids.dim() == 2 else position_ids.view(1, -1)
        # From the last token (a padded row's first positions may have been clamped).
        shift = context.sequence_len_offset + rows.shape[1] - 1 - rows[:, -1]
        if not bool((shift != 0).any()):
            return table   # every row starts at slot 0: Megatron's own table is exact
        cached = getattr(context, "_apt_rows_rotary", None)
        if cached is not None and torch.equal(cached[0], shift):
            return cached[1]
        slots = torch.arange(table.shape[0], device=rows.device, dtype=rows.dtype)
        positions = (slots[None, :] - shift[:, None]).clamp(min=0)
        per_row = rotary_table_at(self.rotary_pos_emb, positions)
        context._apt_rows_rotary = (shift, per_row)
        return per_row
