"""Analytic parameter counts of the Llama-style decoder (what the plan sizes memory with).

Exact for every family ModelConfig describes: tests/test_real_profiles.py checks the total
against transformers' own model of the same config (Llama 3.2, Qwen2.5, Qwen3, Qwen3-MoE,
Mistral). The vocabulary is counted as model.vocab_size: APT does not pad it (tensor parallel
needs TP to divide it)."""
from __future__ import annotations

from dataclasses import dataclass

from apt.core.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    embedding: int          # input embedding (V x h)
    output: int             # output projection, 0 when tied to the embedding
    attention_per_layer: int
    mlp_per_layer: int      # all experts for MoE
    norms_per_layer: int     # RMSNorm weights (not split over TP)
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


def attention_widths(m: ModelConfig) -> tuple[int, int]:
    """(query width, key/value width): heads x head dimension, KV heads x head dimension (the
    head dimension need not be hidden / heads: Qwen3, Gemma)."""
    return m.num_attention_heads * m.head_size, m.kv_heads * m.head_size


def expert_ffn_size(m: ModelConfig) -> int:
    """One MLP's width: an MoE expert's (moe_ffn_hidden_size) or the dense MLP's."""
    return (m.moe_ffn_hidden_size or m.ffn_size) if m.num_experts else m.ffn_size


def count_parameters(m: ModelConfig) -> ParamCounts:
    h = m.hidden_size
    q_dim, kv_dim = attention_widths(m)
    attention = h * q_dim + 2 * h * kv_dim + q_dim * h   # q, k, v, out
    if m.qkv_bias:
        attention += q_dim + 2 * kv_dim                   # split over TP with the projections
    # Two RMSNorms, the q/k head norms (one weight of head_dim each, kept whole on every TP rank).
    norms = 2 * h + (2 * m.head_size if m.qk_norm else 0)
    one_mlp = 3 * h * expert_ffn_size(m)                  # gate, up, down (SwiGLU / GeGLU)
    experts = m.num_experts or 1
    return ParamCounts(
        embedding=m.vocab_size * h,
        output=0 if m.tie_embeddings else m.vocab_size * h,
        attention_per_layer=attention,
        mlp_per_layer=experts * one_mlp,
        norms_per_layer=norms,
        router_per_layer=h * m.num_experts if m.num_experts else 0,
        final_norm=h,
        num_layers=m.num_layers,
        active_mlp_per_layer=min(m.moe_top_k, experts) * one_mlp if m.num_experts else one_mlp,
    )


def matmul_parameters(m: ModelConfig) -> int:
    """Weights a token multiplies by in one forward pass (what MFU counts, apt/trainops/eval/
    flops.py): q, k, v, out, the MLP of the experts it is routed to (top-k), the router, per
    layer, and the output projection (a matmul even when tied); not the input embedding (a
    lookup) nor the norms."""
    c = count_parameters(m)
    per_layer = c.attention_per_layer + c.active_mlp_per_layer + c.router_per_layer
    return m.num_layers * per_layer + m.vocab_size * m.hidden_size


def count_lora_parameters(m: ModelConfig, lora, *, tp: int = 1) -> tuple[int, int]:
    """(adapter parameters of the whole model, of one layer on one TP rank) that
    ``apt.model.lora.apply_lora`` adds: r x (in + out) per target, where a column-parallel
    target (qkv, fc1) shards its B over TP and a row-parallel one (proj, fc2) its A."""
    h = m.hidden_size
    q_dim, kv_dim = attention_widths(m)
    shapes = {"linear_qkv": ("column", h, q_dim + 2 * kv_dim),
              "linear_proj": ("row", q_dim, h),
              "linear_fc1": ("column", h, 2 * m.ffn_size),   # SwiGLU: gate and up fused
              "linear_fc2": ("row", m.ffn_size, h)}
    r, total, per_rank = lora.rank, 0, 0
    for target in lora.targets if r else ():
        kind, fan_in, fan_out = shapes[target]
        total += r * (fan_in + fan_out)
        per_rank += (r * fan_in + r * fan_out // tp if kind == "column"
                     else r * fan_in // tp + r * fan_out)
    return total * m.num_layers, per_rank
