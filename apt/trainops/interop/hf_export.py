"""Export: APT weights -> a Hugging Face directory that
``transformers.AutoModelForCausalLM.from_pretrained`` loads as is, in the family that holds the
model's features (``hf_family``).

Export reads weights from a model in memory (one process, TP = PP = 1) or from a
``dist_checkpointing`` weights directory written by any layout: the directory is loaded into a
one-process TP1 model, which is where TP/PP/VP/EP shards are put back together.
"""
from __future__ import annotations

from pathlib import Path

import torch

from apt.core.config import ConfigError, ModelConfig
from .hf_families import hf_config, hf_family
from .hf_files import write_safetensors
from .hf_weights import megatron_to_hf


def export_hf(source, model_config: ModelConfig, out_dir: str | Path, *,
              dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30,
              tokenizer=None, model_class=None) -> Path:
    """Write ``out_dir`` (config.json + safetensors) for the Hugging Face family that holds
    ``model_config`` (``hf_family``: Llama, Mistral, Qwen2, Qwen3, Gemma, Mixtral or Qwen3-MoE).

    ``source``: an ``APTModel`` (or a one-element list of modules) built for one process, or a
    ``dist_checkpointing`` weights directory from any layout, put back together in a
    one-process ``model_class`` (``APTModel``, from the caller: interop sits below
    ``apt/model``). ``dtype`` defaults to the weights' own dtype (the stored dtype for a
    directory). ``tokenizer`` (an ``apt.trainops.data`` tokenizer, the one the model was
    trained with): its files for
    ``AutoTokenizer`` and its end-of-document / pad ids in config.json and
    generation_config.json, with every id APT stops at as eos (``hf_eos_ids``: the chat
    template's end of turn too), so that ``generate()`` stops where APT's sampler does. Without
    one, no special-token ids are written (not Llama's defaults, which mean other tokens)."""
    hf_family(model_config)   # refuse what no family holds before reading any weights
    if isinstance(source, (str, Path)):
        if model_class is None:
            raise ValueError("export_hf from a weights directory needs model_class (APTModel): "
                             "the shards are put back together in a one-process model")
        state, stored_dtype = _load_weights_dir(source, model_config, model_class)
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
    write_safetensors(tensors, out, max_shard_bytes)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def hf_eos_ids(tokenizer) -> int | list[int]:
    """config.json's / generation_config.json's ``eos_token_id``: every id that ends an answer
    in APT (``stop_ids``: the end-of-document token, the tokenizer's eos and its chat
    template's end of turn, ``<|im_end|>`` / ``<|eot_id|>``), so that transformers'
    ``generate()`` stops where APT's sampler does. One id as an int, several as a list (both
    are transformers' format; Llama 3's own config lists three)."""
    from apt.trainops.data.tokenizers.chat_template import stop_ids
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


def _load_weights_dir(directory, cfg: ModelConfig, model_class) -> tuple[dict, torch.dtype]:
    """Reshard a weights directory from any layout into a one-process TP1 model."""
    from apt.trainops.checkpoints import load_model_weights
    from apt.trainops.checkpoints.verification import check_weights_dir
    directory = find_weights_dir(directory)
    # Checked before anything unpickles it; the stored dtype comes from the checked metadata.
    metadata = check_weights_dir(directory)
    meta = metadata.state_dict_metadata.get("embedding.word_embeddings.weight")
    model = model_class(cfg)
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
