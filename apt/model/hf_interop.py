"""Hugging Face interop: APT's Megatron ``GPTModel`` <-> a Llama (dense) or Mixtral (MoE)
directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads as is.

Export reads weights from a model in memory (one process, TP = PP = 1) or from a
``dist_checkpointing`` weights directory written by any layout: the directory is loaded into a
one-process TP1 model, which is where TP/PP/VP/EP shards are put back together.
Import builds a one-process ``APTModel`` from an HF directory; ``import_hf_to_weights`` saves
it as a ``dist_checkpointing`` directory that any layout starts from (``training.init_from``).

Weight layout differences (Megatron -> HF):
- ``linear_qkv`` rows are grouped per query group: [q heads of group g, k of g, v of g] for
  g = 0..groups-1; HF keeps separate q/k/v projections. HF's ``repeat_kv`` gives query head i
  the kv head i // (heads / groups), the same grouping.
- ``linear_fc1`` is [gate; up] stacked along rows (SwiGLU ``silu(gate) * up``); HF keeps
  ``gate_proj``/``up_proj`` (Mixtral: ``w1``/``w3``; ``w2`` = ``linear_fc2``).
- RoPE: Megatron's default (non-interleaved, ``rotate_half``) is HF's Llama RoPE, no permutation.
- MoE routing: Megatron's default (softmax score, ``moe_router_pre_softmax=False``) takes the
  top-k logits and softmaxes over them; Mixtral softmaxes over all experts, takes the top-k and
  renormalises. Both give ``exp(l_i) / sum_{j in topk} exp(l_j)``: the same weights.
"""
from __future__ import annotations

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
    """Write ``out_dir`` (config.json + safetensors) for ``LlamaForCausalLM`` or, when
    ``model_config.num_experts`` is set, ``MixtralForCausalLM``.

    ``source``: an ``APTModel`` (or a one-element list of modules) built for one process, or a
    ``dist_checkpointing`` weights directory from any layout. ``dtype`` defaults to the
    weights' own dtype (the stored dtype for a directory). ``tokenizer`` (an
    ``apt.trainops.data`` tokenizer, the one the model was trained with): its files for
    ``AutoTokenizer`` and its end-of-document / pad ids in config.json and
    generation_config.json, so that ``generate()`` stops where APT's documents end. Without
    one, no special-token ids are written (not Llama's defaults, which mean other tokens)."""
    if model_config.num_experts and (model_config.moe_score_function != "softmax"
                                     or model_config.moe_expert_bias):
        # Mixtral routes by softmax over the top-k logits, with no per-expert bias.
        raise ConfigError("Mixtral routes with softmax scores and no expert bias: this "
                          "router (sigmoid scores / expert bias) has no Hugging Face form",
                          key="model.moe_score_function")
    if isinstance(source, (str, Path)):
        state, stored_dtype = _load_weights_dir(source, model_config)
    else:
        state, stored_dtype = _unsharded_state(source)
    dtype = dtype or stored_dtype
    tensors = megatron_to_hf(state, model_config)
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in tensors.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = ({"bos_token_id": tokenizer.eod_id, "eos_token_id": tokenizer.eod_id,
                 "pad_token_id": tokenizer.pad_id} if tokenizer is not None else
                {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None})
    config = hf_config(model_config, dtype, **specials)
    config.save_pretrained(str(out))
    _generation_config(config).save_pretrained(str(out))
    _write_safetensors(tensors, out, max_shard_bytes)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _generation_config(config):
    """generation_config.json: the special ids only (transformers' defaults otherwise). APT
    adds no beginning-of-sequence token: its bos is the end-of-document token (GPT-2's
    convention), since a document starts after one."""
    import transformers
    return transformers.GenerationConfig(bos_token_id=config.bos_token_id,
                                         eos_token_id=config.eos_token_id,
                                         pad_token_id=config.pad_token_id)


def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32, **special_ids):
    """The transformers config object (the installed version decides the JSON field names).
    ``special_ids``: ``bos_token_id``, ``eos_token_id``, ``pad_token_id`` (export_hf)."""
    import transformers
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.hidden_size // cfg.num_attention_heads, hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings,
        rope_theta=cfg.rope_base, dtype=_DTYPE_NAMES[dtype], **special_ids)
    if cfg.num_experts:
        config = transformers.MixtralConfig(
            num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.moe_top_k,
            router_jitter_noise=0.0, sliding_window=None, **common)
        config.architectures = ["MixtralForCausalLM"]
    else:
        config = transformers.LlamaConfig(attention_bias=False, mlp_bias=False, **common)
        config.architectures = ["LlamaForCausalLM"]
    return config


def megatron_to_hf(state: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A full (TP1, all layers) Megatron state dict -> HF tensor names."""
    heads, groups = cfg.num_attention_heads, cfg.kv_heads
    head_dim, ffn = cfg.hidden_size // heads, cfg.ffn_size
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
           "model.norm.weight": state["decoder.final_layernorm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["output_layer.weight"]
    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = state[m + "input_layernorm.weight"]
        out[h + "post_attention_layernorm.weight"] = state[m + "pre_mlp_layernorm.weight"]
        qkv = state[m + "self_attention.linear_qkv.weight"]
        qkv = qkv.reshape(groups, (heads // groups + 2) * head_dim, cfg.hidden_size)
        q, k, v = qkv.split([heads // groups * head_dim, head_dim, head_dim], dim=1)
        out[h + "self_attn.q_proj.weight"] = q.reshape(heads * head_dim, cfg.hidden_size)
        out[h + "self_attn.k_proj.weight"] = k.reshape(groups * head_dim, cfg.hidden_size)
        out[h + "self_attn.v_proj.weight"] = v.reshape(groups * head_dim, cfg.hidden_size)
        out[h + "self_attn.o_proj.weight"] = state[m + "self_attention.linear_proj.weight"]
        if cfg.num_experts:
            out[h + "block_sparse_moe.gate.weight"] = state[m + "mlp.router.weight"]
            for e in range(cfg.num_experts):
                me, he = f"{m}mlp.experts.local_experts.{e}.", f"{h}block_sparse_moe.experts.{e}."
                out[he + "w1.weight"], out[he + "w3.weight"] = \
                    state[me + "linear_fc1.weight"].split(ffn)
                out[he + "w2.weight"] = state[me + "linear_fc2.weight"]
        else:
            out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = \
                state[m + "mlp.linear_fc1.weight"].split(ffn)
            out[h + "mlp.down_proj.weight"] = state[m + "mlp.linear_fc2.weight"]
    return out


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
    Llama/Mistral/Mixtral directory's weights. Returns ``(ModelConfig, model)``."""
    from apt.model.architectures import APTModel
    hf_dir = Path(hf_dir)
    cfg = model_config_from_hf(json.loads((hf_dir / "config.json").read_text()), hf_dir)
    model = (model_class or APTModel)(cfg)
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    state = hf_to_megatron(_read_safetensors(hf_dir), cfg)
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


_SUPPORTED = ("llama", "mistral", "mixtral")


def model_config_from_hf(hf: dict, where: str | Path = "config.json") -> ModelConfig:
    """An APT ``ModelConfig`` for a Llama-family config.json, or a ConfigError naming what
    APT's decoder cannot represent."""
    def refuse(message):
        raise ConfigError(f"{where}: {message}")
    model_type = hf.get("model_type")
    if model_type not in _SUPPORTED:
        refuse(f"model_type {model_type!r} is not supported (expected one of {_SUPPORTED})")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        refuse(f"RoPE scaling {rope!r} is not supported (APT uses plain RoPE)")
    if hf.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act {hf['hidden_act']!r} is not supported (SwiGLU uses silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        refuse("biases in attention/MLP are not supported (APT's linears have none)")
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    if hf.get("head_dim") not in (None, hidden // heads):
        refuse(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    window = hf.get("sliding_window")
    if window is not None and window < hf.get("max_position_embeddings", 0):
        refuse(f"sliding_window {window} is not supported (APT attends to the whole sequence)")
    experts = hf.get("num_local_experts") if model_type == "mixtral" else None
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    return ModelConfig(
        hidden_size=hidden, num_layers=hf["num_hidden_layers"], num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        ffn_hidden_size=hf["intermediate_size"], vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048), rope_base=float(theta),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02), num_experts=experts,
        moe_top_k=hf.get("num_experts_per_tok", 2) if experts else ModelConfig.moe_top_k)


def hf_to_megatron(tensors: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF Llama/Mixtral tensor names -> a full (TP1) Megatron state dict, fp32."""
    t = {k: v.to(torch.float32) for k, v in tensors.items()}
    heads, groups = cfg.num_attention_heads, cfg.kv_heads
    head_dim = cfg.hidden_size // heads
    out = {"embedding.word_embeddings.weight": t.pop("model.embed_tokens.weight"),
           "decoder.final_layernorm.weight": t.pop("model.norm.weight")}
    lm_head = t.pop("lm_head.weight", None)
    if not cfg.tie_embeddings:
        out["output_layer.weight"] = lm_head
    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[m + "input_layernorm.weight"] = t.pop(h + "input_layernorm.weight")
        out[m + "pre_mlp_layernorm.weight"] = t.pop(h + "post_attention_layernorm.weight")
        q = t.pop(h + "self_attn.q_proj.weight").reshape(groups, -1, cfg.hidden_size)
        k = t.pop(h + "self_attn.k_proj.weight").reshape(groups, head_dim, cfg.hidden_size)
        v = t.pop(h + "self_attn.v_proj.weight").reshape(groups, head_dim, cfg.hidden_size)
        out[m + "self_attention.linear_qkv.weight"] = \
            torch.cat([q, k, v], dim=1).reshape(-1, cfg.hidden_size)
        out[m + "self_attention.linear_proj.weight"] = t.pop(h + "self_attn.o_proj.weight")
        if cfg.num_experts:
            _moe_to_megatron(t, out, m, h, cfg)
        else:
            out[m + "mlp.linear_fc1.weight"] = torch.cat(
                [t.pop(h + "mlp.gate_proj.weight"), t.pop(h + "mlp.up_proj.weight")])
            out[m + "mlp.linear_fc2.weight"] = t.pop(h + "mlp.down_proj.weight")
    unused = [k for k in t if not k.endswith("rotary_emb.inv_freq")]
    if unused:
        raise ConfigError(f"HF weights APT has no place for: {', '.join(sorted(unused)[:6])}")
    return out


def _moe_to_megatron(t: dict, out: dict, m: str, h: str, cfg: ModelConfig) -> None:
    # On disk Mixtral keeps one tensor per expert (what save_pretrained writes, 4.x and 5.x);
    # transformers 5 models hold them fused (mlp.experts.gate_up_proj [E, 2F, H],
    # mlp.experts.down_proj [E, H, F]): accept both.
    if h + "mlp.experts.gate_up_proj" in t:
        gate_up, down = t.pop(h + "mlp.experts.gate_up_proj"), t.pop(h + "mlp.experts.down_proj")
        out[m + "mlp.router.weight"] = t.pop(h + "mlp.gate.weight")
        for e in range(cfg.num_experts):
            out[f"{m}mlp.experts.local_experts.{e}.linear_fc1.weight"] = gate_up[e]
            out[f"{m}mlp.experts.local_experts.{e}.linear_fc2.weight"] = down[e]
        return
    out[m + "mlp.router.weight"] = t.pop(h + "block_sparse_moe.gate.weight")
    for e in range(cfg.num_experts):
        he = f"{h}block_sparse_moe.experts.{e}."
        me = f"{m}mlp.experts.local_experts.{e}."
        out[me + "linear_fc1.weight"] = torch.cat([t.pop(he + "w1.weight"),
                                                   t.pop(he + "w3.weight")])
        out[me + "linear_fc2.weight"] = t.pop(he + "w2.weight")


def _read_safetensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    index = hf_dir / HF_INDEX
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / HF_WEIGHTS).is_file():
        files = [HF_WEIGHTS]
    else:
        raise FileNotFoundError(f"{hf_dir}: no {HF_WEIGHTS} or {HF_INDEX} (only safetensors "
                                f"checkpoints are read)")
    tensors = {}
    for name in files:
        # The index names files of this directory (hub snapshots link them: links are fine).
        if not isinstance(name, str) or "/" in name or "\\" in name or name in (".", ".."):
            raise ConfigError(f"{index}: {name!r} is not a file of {hf_dir}")
        tensors.update(load_file(str(hf_dir / name)))
    return tensors

