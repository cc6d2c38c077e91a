"""The ``model:`` section (a Llama-style decoder, its MoE router and model-family features) and
the ``lora:`` section (adapters on its linears), with the rules between their keys."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from .rules import rule


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, optional MoE."""
    hidden_size: int = rule(128, gt=0)
    num_layers: int = rule(4, gt=0)
    num_attention_heads: int = rule(4, gt=0)
    # Key/value heads for grouped-query attention; equal to num_attention_heads means plain MHA.
    num_query_groups: Optional[int] = rule(None, gt=0)
    ffn_hidden_size: Optional[int] = rule(None, gt=0)
    vocab_size: int = rule(512, gt=0)
    max_seq_len: int = rule(128, gt=0)
    rope_base: float = rule(10000.0, gt=0)
    norm_eps: float = rule(1e-5, gt=0)
    tie_embeddings: bool = False
    init_std: float = rule(0.02, gt=0)
    num_experts: Optional[int] = rule(None, gt=1)
    moe_top_k: int = rule(2, gt=0)
    # MoE router (read only when num_experts is set; apt/model/moe_routing.py maps them to
    # Megatron's TransformerConfig). Load balancing: aux_loss (Switch/GShard, per
    # micro-batch), seq_aux_loss (DeepSeek, per sequence), global_aux_loss (counts over the
    # global batch), sinkhorn (S-BASE, no loss), none. Megatron's own default is no loss at all.
    moe_load_balancing: Literal["aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn",
                                "none"] = "aux_loss"
    moe_aux_loss_coeff: float = rule(1e-2, ge=0)
    moe_z_loss_coeff: float = rule(0.0, ge=0)       # ST-MoE router z-loss; 1e-3 is typical
    moe_score_function: Literal["softmax", "sigmoid"] = "softmax"
    # Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the sigmoid scores for
    # the top-k choice only, moved by +-rate after each step towards the mean load.
    moe_expert_bias: bool = False
    moe_bias_update_rate: float = rule(1e-3, gt=0)
    # Expert capacity = factor x tokens x top_k / experts; tokens over it are dropped (their
    # residual passes through). None: no dropping.
    moe_capacity_factor: Optional[float] = rule(None, gt=0)
    moe_drop_policy: Literal["probs", "position"] = "probs"
    # Model-family features (Llama 3.x, Qwen2/2.5, Qwen3, Qwen3-MoE, Mistral, Gemma), each on
    # Megatron-core's own option where it has one (apt/model/megatron_gpt.py maps them).
    # Per-head dimension; None = hidden_size / num_attention_heads (Qwen3 and Gemma set it).
    head_dim: Optional[int] = rule(None, gt=0)
    qkv_bias: bool = False            # a bias on the q/k/v projections (Qwen2/2.5)
    qk_norm: bool = False             # RMSNorm over each head's q and k (Qwen3, Qwen3-MoE)
    # RoPE frequency scaling for long context: "linear" divides positions by the factor;
    # "llama3" rescales the low frequencies (Llama 3.1-3.3; factor, low/high frequency factors
    # and the original context length as in its config.json's rope_scaling).
    rope_scaling: Literal["none", "linear", "llama3"] = "none"
    rope_scaling_factor: float = rule(1.0, gt=0)
    rope_low_freq_factor: float = rule(1.0, gt=0)
    rope_high_freq_factor: float = rule(4.0, gt=0)
    rope_original_max_seq_len: int = rule(8192, gt=0)
    # Sliding-window attention (Mistral): each token attends to itself and the window - 1 before
    # it. None = the whole (causal) sequence.
    sliding_window: Optional[int] = rule(None, gt=0)
    # The MLP: "swiglu" (silu(gate) * up; Llama, Qwen, Mistral) or "geglu" (tanh-GELU gate: Gemma).
    activation: Literal["swiglu", "geglu"] = "swiglu"
    # Gemma's RMSNorm multiplies by (1 + w), with w stored zero-centred.
    norm_zero_centered: bool = False
    # Gemma scales the embeddings by sqrt(hidden_size) before the first layer.
    scale_embeddings: bool = False
    # MoE experts' width; None = ffn_hidden_size (Qwen3-MoE's moe_intermediate_size).
    moe_ffn_hidden_size: Optional[int] = rule(None, gt=0)
    # Router weights: True = softmax over the chosen top-k (renormalised: Mixtral, Qwen3-MoE with
    # norm_topk_prob); False = softmax over all experts, top-k kept as they are.
    moe_norm_topk_prob: bool = True
    # Fused kernels (apt/kernels, sources in kernels/): "auto" = every kernel that builds on this
    # machine (the others run eager, with a warning), "none", or a list of rmsnorm, rope,
    # linear_cross_entropy (each must build). Same losses on or off; built on first use.
    kernels: Any = "auto"

    @property
    def kv_heads(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_size(self) -> int:
        """Per-head dimension: head_dim, or hidden_size / num_attention_heads."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        """SwiGLU width: Llama's 8/3 * hidden rounded up to a multiple of 64 unless given."""
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        return ((8 * self.hidden_size // 3) + 63) // 64 * 64


LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters on the transformer's linears (apt/model/lora.py); the base is frozen."""
    rank: int = rule(0, ge=0)            # 0: LoRA off
    alpha: float = rule(16.0, gt=0)      # the update B @ A is scaled by alpha / rank
    dropout: float = rule(0.0, ge=0, lt=1)   # on the adapter's input, in training only
    targets: list = rule(list(LORA_TARGETS))

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0


def model_checks(m: ModelConfig):
    """Rules between ``model`` keys (head shapes, RoPE scaling, the router, the kernels)."""
    if m.head_dim is None and m.hidden_size % m.num_attention_heads:
        yield "model.hidden_size", (f"{m.hidden_size} is not divisible by "
                                    f"model.num_attention_heads={m.num_attention_heads} "
                                    f"(or set model.head_dim)")
    if m.num_attention_heads % m.kv_heads:
        yield "model.num_query_groups", (f"{m.kv_heads} must divide "
                                         f"model.num_attention_heads={m.num_attention_heads}")
    if m.head_size % 2:
        yield ("model.head_dim" if m.head_dim else "model.hidden_size"), (
            f"head dimension {m.head_size} must be even for RoPE")
    if m.rope_scaling == "llama3" and m.rope_high_freq_factor <= m.rope_low_freq_factor:
        yield "model.rope_high_freq_factor", (
            f"{m.rope_high_freq_factor} must exceed model.rope_low_freq_factor="
            f"{m.rope_low_freq_factor}")
    yield from _moe_checks(m)
    from apt.kernels import check_setting
    if (problem := check_setting(m.kernels)) is not None:
        yield "model.kernels", problem


def _moe_checks(m: ModelConfig):
    """Router settings Megatron cannot combine (it would raise deep in model construction)."""
    if m.num_experts is None:
        return
    if m.moe_top_k > m.num_experts:
        yield "model.moe_top_k", f"{m.moe_top_k} exceeds model.num_experts={m.num_experts}"
    elif m.moe_top_k == 1 and m.moe_score_function == "softmax" and \
            m.moe_load_balancing != "sinkhorn":
        yield "model.moe_top_k", ("1 with softmax scores gives the router no gradient (softmax "
                                  "over one expert is 1): use top_k >= 2 or "
                                  "model.moe_score_function sigmoid")
    if m.moe_expert_bias and m.moe_score_function != "sigmoid":
        yield "model.moe_expert_bias", ("needs model.moe_score_function sigmoid (the bias "
                                        f"shifts sigmoid scores), got {m.moe_score_function!r}")
    if m.moe_capacity_factor is not None and m.moe_load_balancing == "sinkhorn":
        yield "model.moe_capacity_factor", ("token dropping does not work with "
                                            "model.moe_load_balancing 'sinkhorn'")


def lora_checks(lora: LoRAConfig, model: ModelConfig):
    targets = lora.targets
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        yield "lora.targets", f"{targets!r}: expected a non-empty list of {', '.join(LORA_TARGETS)}"
        return
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
        yield "lora.targets", (f"unknown target(s) {', '.join(unknown)}; known: "
                               f"{', '.join(LORA_TARGETS)}")
    elif len(set(targets)) != len(targets):
        yield "lora.targets", f"{targets!r} names a target twice"
    elif lora.rank and model.num_experts and {"linear_fc1", "linear_fc2"} & set(targets):
        yield "lora.targets", ("adapters on MoE experts are not supported: target "
                               "linear_qkv and linear_proj only")
