"""Analytic parameter counts of the Llama-style decoder (what the plan sizes memory with)."""
from __future__ import annotations

from dataclasses import dataclass

from apt.core.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    embedding: int          # input embedding (V x h)
    output: int             # output projection, 0 when tied to the embedding
    attention_per_layer: int
    mlp_per_layer: int      # all experts for MoE
    norms_per_layer: int
    router_per_layer: int
    final_norm: int
    num_layers: int
    active_mlp_per_layer: int  # what one token passes through (top-k experts for MoE)

    @property
    def per_layer(self) -> int:
        return (self.attention_per_layer + self.mlp_per_layer + self.norms_per_layer
                + self.router_per_layer)

    @property
    def total(self) -> int:
        return self.embedding + self.output + self.final_norm + self.num_layers * self.per_layer

    @property
    def active(self) -> int:
        """Parameters used per token (equals total for dense models)."""
        dense = self.per_layer - self.mlp_per_layer + self.active_mlp_per_layer
        return self.embedding + self.output + self.final_norm + self.num_layers * dense


def count_parameters(m: ModelConfig) -> ParamCounts:
    h, head_dim = m.hidden_size, m.hidden_size // m.num_attention_heads
    kv_dim = m.kv_heads * head_dim
    attention = h * h + 2 * h * kv_dim + h * h  # q, k, v, out (no biases)
    one_mlp = 3 * h * m.ffn_size                # gate, up, down (SwiGLU)
    experts = m.num_experts or 1
    return ParamCounts(
        embedding=m.vocab_size * h,
        output=0 if m.tie_embeddings else m.vocab_size * h,
        attention_per_layer=attention,
        mlp_per_layer=experts * one_mlp,
        norms_per_layer=2 * h,
        router_per_layer=h * m.num_experts if m.num_experts else 0,
        final_norm=h,
        num_layers=m.num_layers,
        active_mlp_per_layer=min(m.moe_top_k, experts) * one_mlp if m.num_experts else one_mlp,
    )


def count_lora_parameters(m: ModelConfig, lora, *, tp: int = 1) -> tuple[int, int]:
    """(adapter parameters of the whole model, of one layer on one TP rank) that
    ``apt.model.lora.apply_lora`` adds: r x (in + out) per target, where a column-parallel
    target (qkv, fc1) shards its B over TP and a row-parallel one (proj, fc2) its A."""
    h, head_dim = m.hidden_size, m.hidden_size // m.num_attention_heads
    shapes = {"linear_qkv": ("column", h, h + 2 * m.kv_heads * head_dim),
              "linear_proj": ("row", h, h),
              "linear_fc1": ("column", h, 2 * m.ffn_size),   # SwiGLU: gate and up fused
              "linear_fc2": ("row", m.ffn_size, h)}
    r, total, per_rank = lora.rank, 0, 0
    for target in lora.targets if r else ():
        kind, fan_in, fan_out = shapes[target]
        total += r * (fan_in + fan_out)
        per_rank += (r * fan_in + r * fan_out // tp if kind == "column"
                     else r * fan_in // tp + r * fan_out)
    return total * m.num_layers, per_rank
