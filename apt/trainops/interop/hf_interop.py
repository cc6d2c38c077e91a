"""Hugging Face interop: APT's Megatron ``GPTModel`` <-> a Llama, Mistral, Qwen2, Qwen3, Gemma
(dense) or Mixtral, Qwen3-MoE (MoE) directory that
``transformers.AutoModelForCausalLM.from_pretrained`` loads as is. Export picks the family
that holds the model's features (``hf_family``); import maps config.json to a ModelConfig and
refuses, in one line naming it, any feature APT cannot represent.

Export reads weights from a model in memory (one process, TP = PP = 1) or from a
``dist_checkpointing`` weights directory written by any layout: the directory is loaded into a
one-process TP1 model, which is where TP/PP/VP/EP shards are put back together.
Import builds a one-process ``APTModel`` from an HF directory; ``import_hf_to_weights`` saves
it as a ``dist_checkpointing`` directory that any layout starts from (``training.init_from``).

Weight layout differences (Megatron -> HF):
- ``linear_qkv`` rows (and its bias, Qwen2) are grouped per query group: [q heads of group
  g, k of g, v of g] for g = 0..groups-1; HF keeps separate q/k/v projections. HF's
  ``repeat_kv`` gives query head i the kv head i // (heads / groups), the same grouping.
- ``linear_fc1`` is [gate; up] stacked along rows (SwiGLU ``silu(gate) * up``); HF keeps
  ``gate_proj``/``up_proj`` (Mixtral: ``w1``/``w3``; ``w2`` = ``linear_fc2``).
- RoPE: Megatron's default (non-interleaved, ``rotate_half``) is HF's Llama RoPE, no permutation.
- MoE routing: Megatron's default (softmax score, ``moe_router_pre_softmax=False``) takes the
  top-k logits and softmaxes over them; Mixtral softmaxes over all experts, takes the top-k and
  renormalises. Both give ``exp(l_i) / sum_{j in topk} exp(l_j)``: the same weights.
  Qwen3-MoE without ``norm_topk_prob`` keeps the softmax over all experts: Megatron's
  ``moe_router_pre_softmax``.
- Qwen3's per-head ``q_norm`` / ``k_norm`` are Megatron's ``q_layernorm`` / ``k_layernorm``.
- Gemma's norm weights are stored zero-centred (applied as 1 + w) on both sides: copied as is.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from apt.core.config import ConfigError, ModelConfig

HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# ----------------------------------------------------------------------------- export

def export_hf(source, model_config: ModelConfig, out_dir: str | Path, *,
              dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30,
              tokenizer=None) -> Path:
    """Write ``out_dir`` (config.json + safetensors) for the Hugging Face family that holds
    ``model_config`` (``hf_family``: Llama, Mistral, Qwen2, Qwen3, Gemma, Mixtral or Qwen3-MoE).

    ``source``: an ``APTModel`` (or a one-element list of modules) built for one process, or a
    ``dist_checkpointing`` weights directory from any layout. ``dtype`` defaults to the
    weights' own dtype (the stored dtype for a directory). ``tokenizer`` (an
    ``apt.trainops.data`` tokenizer, the one the model was trained with): its files for
    ``AutoTokenizer`` and its end-of-document / pad ids in config.json and
    generation_config.json, with every id APT stops at as eos (``hf_eos_ids``: the chat
    template's end of turn too), so that ``generate()`` stops where APT's sampler does. Without
    one, no special-token ids are written (not Llama's defaults, which mean other tokens)."""
    hf_family(model_config)   # refuse what no family holds before reading any weights
    if isinstance(source, (str, Path)):
        state, stored_dtype = _load_weights_dir(source, model_config)
    else:
        state, stored_dtype = _unsharded_state(source)
    dtype = dtype or stored_dtype
    tensors = megatron_to_hf(state, model_config)
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in tensors.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = ({"bos_token_id": tokenizer.eod_id, "eos_token_id": hf_eos_ids(tokenizer),
                 "pad_token_id": tokenizer.pad_id} if tokenizer is not None else
                {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None})
    config = hf_config(model_config, dtype, **specials)
    config.save_pretrained(str(out))
    _generation_config(config).save_pretrained(str(out))
    _write_safetensors(tensors, out, max_shard_bytes)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def hf_eos_ids(tokenizer) -> int | list[int]:
    """config.json's / generation_config.json's ``eos_token_id``: every id that ends an answer
    in APT (``stop_ids``: the end-of-document token, the tokenizer's eos and its chat
    template's end of turn, ``<|im_end|>`` / ``<|eot_id|>``), so that transformers'
    ``generate()`` stops where APT's sampler does. One id as an int, several as a list (both
    are transformers' format; Llama 3's own config lists three)."""
    from apt.trainops.data.chat_template import stop_ids
    ids = list(stop_ids(tokenizer))
    return ids[0] if len(ids) == 1 else ids


def _generation_config(config):
    """generation_config.json: the special ids only (transformers' defaults otherwise). APT
    adds no beginning-of-sequence token: its bos is the end-of-document token (GPT-2's
    convention), since a document starts after one."""
    import transformers
    return transformers.GenerationConfig(bos_token_id=config.bos_token_id,
                                         eos_token_id=config.eos_token_id,
                                         pad_token_id=config.pad_token_id)


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


def megatron_to_hf(state: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A full (TP1, all layers) Megatron state dict -> HF tensor names of ``hf_family(cfg)``."""
    family = hf_family(cfg)
    heads, groups, head_dim = cfg.num_attention_heads, cfg.kv_heads, cfg.head_size
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
           "model.norm.weight": state["decoder.final_layernorm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["output_layer.weight"]
    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = state[m + "input_layernorm.weight"]
        out[h + "post_attention_layernorm.weight"] = state[m + "pre_mlp_layernorm.weight"]
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            qkv = state[m + f"self_attention.linear_qkv.{kind}"]   # [rows, hidden] or [rows]
            rest = qkv.shape[1:]
            q, k, v = qkv.reshape(groups, (heads // groups + 2) * head_dim, *rest).split(
                [heads // groups * head_dim, head_dim, head_dim], dim=1)
            for name, part in (("q", q), ("k", k), ("v", v)):
                out[h + f"self_attn.{name}_proj.{kind}"] = part.reshape(-1, *rest)
        if cfg.qk_norm:
            out[h + "self_attn.q_norm.weight"] = state[m + "self_attention.q_layernorm.weight"]
            out[h + "self_attn.k_norm.weight"] = state[m + "self_attention.k_layernorm.weight"]
        out[h + "self_attn.o_proj.weight"] = state[m + "self_attention.linear_proj.weight"]
        if cfg.num_experts:
            names = _EXPERT_NAMES[family]
            width = cfg.moe_ffn_hidden_size or cfg.ffn_size
            out[h + names["gate"]] = state[m + "mlp.router.weight"]
            for e in range(cfg.num_experts):
                me, he = f"{m}mlp.experts.local_experts.{e}.", f"{h}{names['experts']}.{e}."
                out[he + names["w1"]], out[he + names["w3"]] = \
                    state[me + "linear_fc1.weight"].split(width)
                out[he + names["w2"]] = state[me + "linear_fc2.weight"]
        else:
            out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = \
                state[m + "mlp.linear_fc1.weight"].split(cfg.ffn_size)
            out[h + "mlp.down_proj.weight"] = state[m + "mlp.linear_fc2.weight"]
    return out


# Per-expert tensor names on disk (what save_pretrained writes, transformers 4.x and 5.x).
_EXPERT_NAMES = {
    "mixtral": {"gate": "block_sparse_moe.gate.weight", "experts": "block_sparse_moe.experts",
                "w1": "w1.weight", "w3": "w3.weight", "w2": "w2.weight"},
    "qwen3_moe": {"gate": "mlp.gate.weight", "experts": "mlp.experts",
                  "w1": "gate_proj.weight", "w3": "up_proj.weight", "w2": "down_proj.weight"},
}


def _unsharded_state(source) -> tuple[dict, torch.dtype]:
    modules = source if isinstance(source, (list, tuple)) else [source]
    model = modules[0]
    config = model.config
    if len(modules) != 1 or max(config.tensor_model_parallel_size,
                                config.pipeline_model_parallel_size,
                                config.expert_model_parallel_size) > 1:
        raise ValueError("export_hf from modules needs the whole model in one process "
                         "(TP = PP = EP = 1); save the weights with save_model_weights and "
                         "export from that directory instead")
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    if any(".lora_" in k for k in state):
        raise ValueError("export_hf: the model has LoRA adapters; fold them into the weights "
                         "first with apt.model.lora.merge_lora(model)")
    return state, state["embedding.word_embeddings.weight"].dtype


def _load_weights_dir(directory, cfg: ModelConfig) -> tuple[dict, torch.dtype]:
    """Reshard a weights directory from any layout into a one-process TP1 model."""
    from apt.model.architectures import APTModel
    from apt.trainops.checkpoints import load_model_weights
    from apt.trainops.checkpoints.verification import check_weights_dir
    directory = find_weights_dir(directory)
    # Checked before anything unpickles it; the stored dtype comes from the checked metadata.
    metadata = check_weights_dir(directory)
    meta = metadata.state_dict_metadata.get("embedding.word_embeddings.weight")
    model = APTModel(cfg)
    load_model_weights([model], directory, verified=True)
    state, _ = _unsharded_state(model)
    return state, getattr(getattr(meta, "properties", None), "dtype", torch.float32)


def find_weights_dir(path: str | Path) -> Path:
    """``path`` itself, or the weights under it: a training checkpoint's ``model``, a run's
    ``model/dist``."""
    path = Path(path)
    for candidate in (path, path / "model", path / "dist", path / "model" / "dist"):
        if (candidate / "metadata.json").is_file():
            return candidate
    raise ConfigError(f"{path}: no dist_checkpointing weights (metadata.json) here or in "
                      f"model/, dist/ or model/dist/")


def _write_safetensors(tensors: dict, out: Path, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    for stale in [*out.glob("model*.safetensors"), out / HF_INDEX]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(out / HF_WEIGHTS), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / HF_INDEX).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


# ----------------------------------------------------------------------------- import

def import_hf(hf_dir: str | Path, model_class=None):
    """Build a one-process fp32 ``APTModel`` (or ``model_class``, a subclass) holding an HF
    directory's weights (``SUPPORTED`` families). Returns ``(ModelConfig, model)``.

    Everything read is checked before anything large is allocated: config.json maps to a
    validated ModelConfig (or one line naming what APT cannot represent), the weight files
    are listed, and the memory the import needs is compared with what the machine has."""
    from apt.model.architectures import APTModel
    hf_dir = Path(hf_dir)
    hf = _read_json(hf_dir / "config.json")
    cfg = model_config_from_hf(hf, hf_dir / "config.json")
    files = _safetensors_files(hf_dir)
    preflight_memory(cfg, hf_dir)
    model = (model_class or APTModel)(cfg)
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    state = hf_to_megatron(_read_safetensors(hf_dir, files), cfg, hf["model_type"])
    if set(state) != set(expected):
        raise ConfigError(f"{hf_dir}: weights do not match the config (missing "
                          f"{sorted(set(expected) - set(state))[:4]}, unexpected "
                          f"{sorted(set(state) - set(expected))[:4]})")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ConfigError(f"{hf_dir}: {name} has shape {tuple(tensor.shape)}, the config "
                              f"implies {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=False)  # strict=False: only the _extra_state entries
    return cfg, model


def import_hf_to_weights(hf_dir: str | Path, out_dir: str | Path) -> ModelConfig:
    """Import ``hf_dir`` and save it as a ``dist_checkpointing`` weights directory that any
    layout loads (``training.init_from=out_dir``)."""
    from apt.trainops.checkpoints import save_model_weights
    cfg, model = import_hf(hf_dir)
    save_model_weights([model], out_dir)
    return cfg


def profile_model_fields(cfg: ModelConfig) -> dict:
    """The profile's ``model:`` section that rebuilds ``cfg`` (``trainops import-hf`` prints
    it): every set field, less the router's settings for a dense model and the RoPE scaling's
    for unscaled RoPE, which mean nothing there."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}
    if not cfg.num_experts:
        fields = {k: v for k, v in fields.items() if not k.startswith("moe_")}
    if cfg.rope_scaling == "none":
        fields = {k: v for k, v in fields.items()
                  if not k.startswith("rope_") or k in ("rope_base", "rope_scaling")}
    return fields


def preflight_memory(cfg: ModelConfig, where, available: int | None = None) -> None:
    """Refuse an import that cannot fit before allocating it: the fp32 model and the fp32
    copy of the weights read from disk (both alive while the state dict is loaded), against
    the memory available now. A config.json with huge dimensions is one line, not an
    out-of-memory kill."""
    import psutil
    from apt.model.sizing import count_parameters
    needed = 2 * 4 * count_parameters(cfg).total
    available = psutil.virtual_memory().available if available is None else available
    if needed > available:
        raise ConfigError(f"{where}: importing this model needs about {needed / 2**30:,.1f} GiB "
                          f"(fp32 model + weights read, {count_parameters(cfg).total:,} "
                          f"parameters), {available / 2**30:,.1f} GiB is available")


SUPPORTED = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"{path}: not readable JSON ({err})") from None


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
    from apt.model.architectures import resolve_model_config
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


def hf_to_megatron(tensors: dict, cfg: ModelConfig, family: str | None = None
                   ) -> dict[str, torch.Tensor]:
    """HF tensor names -> a full (TP1) Megatron state dict, fp32."""
    t = {k: v.to(torch.float32) for k, v in tensors.items()}
    heads, groups, head_dim = cfg.num_attention_heads, cfg.kv_heads, cfg.head_size
    out = {"embedding.word_embeddings.weight": t.pop("model.embed_tokens.weight"),
           "decoder.final_layernorm.weight": t.pop("model.norm.weight")}
    lm_head = t.pop("lm_head.weight", None)
    if not cfg.tie_embeddings:
        out["output_layer.weight"] = lm_head
    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[m + "input_layernorm.weight"] = t.pop(h + "input_layernorm.weight")
        out[m + "pre_mlp_layernorm.weight"] = t.pop(h + "post_attention_layernorm.weight")
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            q, k, v = (t.pop(h + f"self_attn.{n}_proj.{kind}") for n in "qkv")
            rest = q.shape[1:]
            q = q.reshape(groups, -1, *rest)
            k, v = (x.reshape(groups, head_dim, *rest) for x in (k, v))
            out[m + f"self_attention.linear_qkv.{kind}"] = \
                torch.cat([q, k, v], dim=1).reshape(-1, *rest)
        if cfg.qk_norm:
            out[m + "self_attention.q_layernorm.weight"] = t.pop(h + "self_attn.q_norm.weight")
            out[m + "self_attention.k_layernorm.weight"] = t.pop(h + "self_attn.k_norm.weight")
        out[m + "self_attention.linear_proj.weight"] = t.pop(h + "self_attn.o_proj.weight")
        if cfg.num_experts:
            _moe_to_megatron(t, out, m, h, cfg, family or hf_family(cfg))
        else:
            out[m + "mlp.linear_fc1.weight"] = torch.cat(
                [t.pop(h + "mlp.gate_proj.weight"), t.pop(h + "mlp.up_proj.weight")])
            out[m + "mlp.linear_fc2.weight"] = t.pop(h + "mlp.down_proj.weight")
    unused = [k for k in t if not k.endswith("rotary_emb.inv_freq")]
    if unused:
        raise ConfigError(f"HF weights APT has no place for: {', '.join(sorted(unused)[:6])}")
    return out


def _moe_to_megatron(t: dict, out: dict, m: str, h: str, cfg: ModelConfig, family: str) -> None:
    # On disk Mixtral and Qwen3-MoE keep one tensor per expert (what save_pretrained writes,
    # 4.x and 5.x); transformers 5 models hold them fused (mlp.experts.gate_up_proj [E, 2F, H],
    # mlp.experts.down_proj [E, H, F]): accept both.
    if h + "mlp.experts.gate_up_proj" in t:
        gate_up, down = t.pop(h + "mlp.experts.gate_up_proj"), t.pop(h + "mlp.experts.down_proj")
        out[m + "mlp.router.weight"] = t.pop(h + "mlp.gate.weight")
        for e in range(cfg.num_experts):
            out[f"{m}mlp.experts.local_experts.{e}.linear_fc1.weight"] = gate_up[e]
            out[f"{m}mlp.experts.local_experts.{e}.linear_fc2.weight"] = down[e]
        return
    names = _EXPERT_NAMES[family]
    out[m + "mlp.router.weight"] = t.pop(h + names["gate"])
    for e in range(cfg.num_experts):
        he, me = f"{h}{names['experts']}.{e}.", f"{m}mlp.experts.local_experts.{e}."
        out[me + "linear_fc1.weight"] = torch.cat([t.pop(he + names["w1"]),
                                                   t.pop(he + names["w3"])])
        out[me + "linear_fc2.weight"] = t.pop(he + names["w2"])


def _safetensors_files(hf_dir: Path) -> list[str]:
    """The weight files an HF directory names, checked (names only, nothing read yet)."""
    index = hf_dir / HF_INDEX
    if index.is_file():
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(f"{index}: no weight_map (a mapping of tensor names to files)")
        files = sorted(set(weight_map.values()))
        for name in files:
            # The index names files of this directory (hub snapshots link them: links are fine).
            if not isinstance(name, str) or "/" in name or "\\" in name or name in (".", ".."):
                raise ConfigError(f"{index}: {name!r} is not a file of {hf_dir}")
            if not (hf_dir / name).is_file():
                raise ConfigError(f"{index}: names {name}, which is not in {hf_dir}")
        return files
    if (hf_dir / HF_WEIGHTS).is_file():
        return [HF_WEIGHTS]
    others = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(
        p.name for p in hf_dir.glob("*.pt"))
    found = f" (found {', '.join(others[:3])}: pickled weights are never read; convert them " \
            f"to safetensors first)" if others else ""
    raise ConfigError(f"{hf_dir}: no {HF_WEIGHTS} or {HF_INDEX}: only safetensors weights are "
                      f"read{found}")


def _read_safetensors(hf_dir: Path, files: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    tensors = {}
    for name in files:
        try:
            tensors.update(load_file(str(hf_dir / name)))
        except (SafetensorError, OSError) as err:
            raise ConfigError(f"{hf_dir / name}: not a readable safetensors file ({err})") \
                from None
    return tensors
