"""config.json -> an APT ModelConfig, for a config.json of a ``SUPPORTED`` family: every feature
APT's decoder cannot represent is refused in one line naming it (nothing is dropped
silently), and the result passes the profile's own checks."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from apt.core.config import ConfigError, ModelConfig

SUPPORTED = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma")


def model_config_from_hf(hf: dict, where: str | Path = "config.json") -> ModelConfig:
    """An APT ``ModelConfig`` for a config.json of a ``SUPPORTED`` family, or a ConfigError
    naming the first feature APT's decoder cannot represent (nothing is dropped silently)."""
    def refuse(message):
        raise ConfigError(f"{where}: {message}")
    if not isinstance(hf, dict):
        refuse("expected a JSON object")
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        refuse(f"model_type {model_type!r} is not supported (expected one of {SUPPORTED})")
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                "intermediate_size"):
        if key not in hf:
            refuse(f"{key} is missing")
    act = hf.get("hidden_act", "gelu_pytorch_tanh" if model_type == "gemma" else "silu")
    if model_type == "gemma" and act == "gelu":
        act = "gelu_pytorch_tanh"   # transformers' GemmaConfig maps the legacy value so too
    if act != ("gelu_pytorch_tanh" if model_type == "gemma" else "silu"):
        refuse(f"hidden_act {act!r} is not supported (APT's {model_type} MLP uses "
               f"{'tanh-GELU' if model_type == 'gemma' else 'silu'})")
    if hf.get("mlp_bias"):
        refuse("mlp_bias is not supported (APT's MLP has no biases)")
    if hf.get("attention_bias"):
        # Llama/Mistral/Qwen3's attention_bias also biases o_proj; Megatron's add_qkv_bias
        # (Qwen2's form) biases q/k/v only.
        refuse("attention_bias (a bias on o_proj too) is not supported; APT has q/k/v biases "
               "only (Qwen2's)")
    if hf.get("use_bidirectional_attention"):
        refuse("use_bidirectional_attention is not supported (APT's decoder is causal)")
    try:
        fields = _fields(hf, model_type, refuse)
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError) as err:
        refuse(f"a malformed value ({type(err).__name__}: {err})")
    # The profile's own checks: types, value rules, and the model's cross-key rules.
    from apt.core.config.validate import _build
    from apt.core.config.model_resolution import resolve_model_config
    try:
        cfg = _build(ModelConfig, fields, "model.", {})
        if cfg.head_dim == cfg.hidden_size // cfg.num_attention_heads:
            cfg = dataclasses.replace(cfg, head_dim=None)   # the default, implicit as in profiles
        return resolve_model_config(cfg, {})
    except ConfigError as err:
        refuse(str(err))


def _fields(hf: dict, model_type: str, refuse) -> dict:
    """config.json's values under APT's ModelConfig names (checked by the caller)."""
    return dict(
        hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_query_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        ffn_hidden_size=hf["intermediate_size"], vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", model_type == "gemma")),
        init_std=hf.get("initializer_range", 0.02),
        head_dim=hf.get("head_dim"),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        sliding_window=_sliding_window(hf, model_type, refuse),
        **(dict(activation="geglu", norm_zero_centered=True, scale_embeddings=True)
           if model_type == "gemma" else {}),
        **_rope_fields(hf, refuse), **_moe_fields(hf, model_type, refuse))


def _rope_fields(hf: dict, refuse) -> dict:
    """RoPE theta and scaling from transformers 5's ``rope_parameters`` or 4.x's
    ``rope_scaling`` + ``rope_theta``."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        refuse(f"rope_parameters {rope!r} is not a mapping")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        refuse(f"partial_rotary_factor {rope['partial_rotary_factor']} is not supported "
               f"(APT rotates the whole head)")
    fields = {"rope_base": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if kind == "linear":
        fields.update(rope_scaling="linear", rope_scaling_factor=float(rope["factor"]))
    elif kind == "llama3":
        fields.update(
            rope_scaling="llama3", rope_scaling_factor=float(rope["factor"]),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_seq_len=int(rope.get("original_max_position_embeddings", 8192)))
    elif kind != "default":
        refuse(f"RoPE scaling {kind!r} is not supported (APT has default, linear and llama3)")
    return fields


def _sliding_window(hf: dict, model_type: str, refuse):
    """The window of every layer, or None. Qwen2/3 slide only with use_sliding_window, and
    then only the layers ``layer_types`` marks (from max_window_layers on): a window on some
    layers only is refused (APT's window is the model's, on every layer)."""
    window = hf.get("sliding_window")
    if model_type.startswith("qwen") and not hf.get("use_sliding_window", False):
        window = None
    if window is None:
        return None
    layer_types = hf.get("layer_types")
    if layer_types is None and model_type in ("qwen2", "qwen3"):
        first = hf.get("max_window_layers", 28)
        layer_types = ["sliding_attention" if i >= first else "full_attention"
                       for i in range(hf["num_hidden_layers"])]
    kinds = set(layer_types or ["sliding_attention"])
    if kinds == {"full_attention"}:
        return None
    if kinds != {"sliding_attention"}:
        refuse(f"sliding_window on some layers only (layer_types / max_window_layers) is not "
               f"supported: APT's window applies to every layer")
    return window


def _moe_fields(hf: dict, model_type: str, refuse) -> dict:
    if model_type == "mixtral":
        return dict(num_experts=hf.get("num_local_experts", 8),
                    moe_top_k=hf.get("num_experts_per_tok", 2))
    if model_type != "qwen3_moe":
        return {}
    if hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"):
        refuse("dense MLP layers between MoE layers (decoder_sparse_step != 1 or "
               "mlp_only_layers) are not supported: every APT layer is MoE")
    if hf.get("shared_expert_intermediate_size"):
        refuse("a shared expert is not supported")
    return dict(num_experts=hf.get("num_experts", hf.get("num_local_experts")),
                moe_top_k=hf.get("num_experts_per_tok", 8),
                moe_ffn_hidden_size=hf.get("moe_intermediate_size"),
                moe_norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                moe_aux_loss_coeff=hf.get("router_aux_loss_coef", 1e-3))
