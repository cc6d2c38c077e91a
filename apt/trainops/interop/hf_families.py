"""Which Hugging Face family holds a ModelConfig (Llama, Mistral, Qwen2, Qwen3, Gemma; Mixtral,
Qwen3-MoE for MoE), and that family's transformers config object."""
from __future__ import annotations

import torch

from apt.core.config import ConfigError, ModelConfig

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32, **special_ids):
    """The transformers config object (the installed version decides the JSON field names) of
    the family that holds ``cfg`` (``hf_family``). ``special_ids``: ``bos_token_id``,
    ``eos_token_id``, ``pad_token_id`` (export_hf)."""
    import transformers
    family = hf_family(cfg)
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_size, hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters=_rope_parameters(cfg), dtype=_DTYPE_NAMES[dtype], **special_ids)
    window = cfg.sliding_window
    qwen_window = dict(use_sliding_window=window is not None, sliding_window=window,
                       max_window_layers=0)   # Qwen: layers >= max_window_layers slide
    if family == "mixtral":
        config = transformers.MixtralConfig(
            num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.moe_top_k,
            router_jitter_noise=0.0, sliding_window=window,
            **{**common, "intermediate_size": cfg.moe_ffn_hidden_size or cfg.ffn_size})
    elif family == "qwen3_moe":
        qwen_window.pop("max_window_layers")   # every Qwen3-MoE layer slides when enabled
        config = transformers.Qwen3MoeConfig(
            num_experts=cfg.num_experts, num_experts_per_tok=cfg.moe_top_k,
            moe_intermediate_size=cfg.moe_ffn_hidden_size or cfg.ffn_size,
            norm_topk_prob=cfg.moe_norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[],
            router_aux_loss_coef=cfg.moe_aux_loss_coeff, attention_bias=False,
            **qwen_window, **common)
    elif family == "qwen3":
        config = transformers.Qwen3Config(attention_bias=False, **qwen_window, **common)
    elif family == "qwen2":
        common.pop("head_dim")   # Qwen2's is always hidden / heads (hf_family checked)
        config = transformers.Qwen2Config(**qwen_window, **common)
    elif family == "mistral":
        config = transformers.MistralConfig(sliding_window=window, **common)
    elif family == "gemma":
        config = transformers.GemmaConfig(attention_bias=False,
                                          **{**common, "hidden_act": "gelu_pytorch_tanh"})
    else:
        config = transformers.LlamaConfig(attention_bias=False, mlp_bias=False, **common)
    config.architectures = [_ARCHITECTURES[family]]
    return config


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "mixtral": "MixtralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                  "gemma": "GemmaForCausalLM"}


def hf_family(cfg: ModelConfig) -> str:
    """The Hugging Face model_type that holds every feature of ``cfg``, or a ConfigError
    naming the one no family has. Qwen3 / Qwen3-MoE have per-head q/k norms, Qwen2 a q/k/v
    bias, Mistral / Mixtral a sliding window, Gemma GeGLU with 1 + w norms and scaled
    embeddings, Llama none of these; all take RoPE scaling."""
    def refuse(key, message):
        raise ConfigError(f"{message}: no Hugging Face family APT exports has this",
                          key=f"model.{key}")
    gemma = (cfg.activation == "geglu", cfg.norm_zero_centered, cfg.scale_embeddings)
    if any(gemma):
        if not all(gemma):
            refuse("activation", "GeGLU, zero-centred norms and scaled embeddings apart from "
                   "each other (Gemma has all three)")
        for key in ("num_experts", "qkv_bias", "qk_norm", "sliding_window"):
            if getattr(cfg, key):
                refuse(key, f"{getattr(cfg, key)!r} in a Gemma-style model")
        return "gemma"
    if cfg.num_experts:
        if cfg.moe_score_function != "softmax" or cfg.moe_expert_bias:
            # Mixtral and Qwen3-MoE route with softmax scores, no per-expert bias.
            raise ConfigError("Mixtral and Qwen3-MoE route with softmax scores and no expert "
                              "bias: this router (sigmoid scores / expert bias) has no "
                              "Hugging Face form", key="model.moe_score_function")
        if cfg.qkv_bias:
            refuse("qkv_bias", "a q/k/v bias in an MoE model")
        if cfg.qk_norm:
            return "qwen3_moe"
        if not cfg.moe_norm_topk_prob:
            refuse("moe_norm_topk_prob", "False without q/k norms (Mixtral renormalises the "
                   "top-k; Qwen3-MoE, which need not, has q/k norms)")
        return "mixtral"
    if cfg.qk_norm:
        if cfg.qkv_bias:   # Qwen3's attention_bias would bias o_proj too
            refuse("qkv_bias", "a q/k/v bias together with q/k norms")
        return "qwen3"
    if cfg.qkv_bias:
        if cfg.head_dim not in (None, cfg.hidden_size // cfg.num_attention_heads):
            refuse("head_dim", f"{cfg.head_dim} != hidden / heads with a q/k/v bias (Qwen2)")
        return "qwen2"
    return "mistral" if cfg.sliding_window is not None else "llama"


def _rope_parameters(cfg: ModelConfig) -> dict:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_base}
    if cfg.rope_scaling == "linear":
        rope.update(rope_type="linear", factor=cfg.rope_scaling_factor)
    elif cfg.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=cfg.rope_scaling_factor,
                    low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_seq_len)
    return rope
