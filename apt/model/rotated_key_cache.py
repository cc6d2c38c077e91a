"""Self-attention whose KV cache holds the keys already rotated (RoPE applied once per token).

Megatron-core's static inference context caches the keys before RoPE and rotates the whole
cache again on every pass (``Attention._adjust_key_value_for_inference`` slices the key table
``[:sequence_end]``): decoding token t rotates t keys per layer. On CPU that was a fifth of the
time of a decoding pass of the tiny model (bench/generation.py). Rotation is per position, so
rotating each key once, when it enters the cache, gives the same keys bit for bit; this is
what Hugging Face's cache does, and what Megatron's own flash-decode path does on GPU.

Only the static-batching, non-flash-decode path changes; training, dynamic batching and flash
decoding go to Megatron's code unchanged.
"""
from __future__ import annotations

from megatron.core.models.common.embeddings.rotary_pos_embedding import apply_rotary_pos_emb
from megatron.core.transformer.attention import (SelfAttention,
                                                 _yarn_get_concentration_factor_from_config)


class RotatedKeyCacheSelfAttention(SelfAttention):
    """``SelfAttention`` that rotates the new keys before they enter the static KV cache."""

    def _adjust_key_value_for_inference(self, inference_context, query, key, value,
                                        rotary_pos_emb, *args, **kwargs):
        if (inference_context is None or not inference_context.is_static_batching()
                or self.config.flash_decode or not isinstance(rotary_pos_emb, tuple)
                or rotary_pos_emb[1] is None):
            return super()._adjust_key_value_for_inference(
                inference_context, query, key, value, rotary_pos_emb, *args, **kwargs)
        q_table, k_table = rotary_pos_emb
        start = inference_context.sequence_len_offset
        end = start + key.size(0)
        key = apply_rotary_pos_emb(key, k_table[start:end], config=self.config,
                                   mscale=_yarn_get_concentration_factor_from_config(self.config),
                                   cp_group=self.pg_collection.cp)
        query, key, value, _, mask_type, block_table = super()._adjust_key_value_for_inference(
            inference_context, query, key, value, None, *args, **kwargs)
        # The queries' rows of the table as Megatron slices them; no key table: the cached
        # keys are rotated already.
        return query, key, value, (q_table[start:end], None), mask_type, block_table
