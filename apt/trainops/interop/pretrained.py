"""``APTModel.from_pretrained(path)``: a one-process model holding saved weights.

What a path may be, recognised by the files in it:
- a training run directory: ``config.yaml`` (its ``model:`` section) + ``model/dist/``;
- a ``dist_checkpointing`` weights directory (``metadata.json``): the model config comes from
  ``apt_model.json`` next to the shards (``save_model_weights`` writes it), or, for a run's
  ``model/dist``, from the run's ``config.yaml`` two levels up;
- a Hugging Face directory (``config.json``; Llama, Mistral, Mixtral, Qwen2, Qwen3,
  Qwen3-MoE, weights in ``*.safetensors``): the importer says in one line what it refuses.
Anything else is one error naming what is accepted and what was found.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from apt.core.config import ModelConfig
from apt.trainops.checkpoints.model_weights import MODEL_CONFIG_FILE

ACCEPTS = ("a training run directory (config.yaml + model/dist/), a dist_checkpointing weights "
           "directory (metadata.json, with apt_model.json or inside a run directory), or a "
           "Hugging Face Llama/Mistral/Mixtral/Qwen2/Qwen3/Qwen3-MoE directory (config.json + "
           "*.safetensors)")


class PretrainedError(ValueError):
    pass


def load_pretrained(model_class, path):
    """An instance of ``model_class`` (APTModel or a subclass) with the weights at ``path``."""
    path = Path(path)
    if (path / "config.json").is_file():
        from .hf_import import import_hf
        return import_hf(path, model_class)[1]
    if (path / "config.yaml").is_file() and (path / "model" / "dist" / "metadata.json").is_file():
        return _from_weights(model_class, path / "model" / "dist",
                             _run_model_config(path / "config.yaml"))
    if (path / "metadata.json").is_file():
        return _from_weights(model_class, path, _weights_model_config(path))
    raise PretrainedError(f"{path}: not a pretrained model; from_pretrained accepts {ACCEPTS}; "
                          f"found {_describe(path)}")


def _from_weights(model_class, directory: Path, config: ModelConfig):
    from apt.trainops.checkpoints import load_model_weights
    model = model_class(config)
    load_model_weights([model], directory)   # resharded from any layout, pickles checked
    return model


def _weights_model_config(directory: Path) -> ModelConfig:
    own = directory / MODEL_CONFIG_FILE
    if own.is_file():
        return model_config_from_dict(json.loads(own.read_text()), own)
    run_config = directory.parent.parent / "config.yaml"   # <run>/model/dist
    if directory.parent.name == "model" and run_config.is_file():
        return _run_model_config(run_config)
    raise PretrainedError(f"{directory}: dist_checkpointing weights without a model config "
                          f"(no {MODEL_CONFIG_FILE} here, no run config.yaml at {run_config}); "
                          f"from_pretrained accepts {ACCEPTS}")


def _run_model_config(path: Path) -> ModelConfig:
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data.get("model"), dict):
        raise PretrainedError(f"{path}: no model: section")
    return model_config_from_dict(data["model"], path)


def model_config_from_dict(data: dict, where) -> ModelConfig:
    """The saved ``model`` fields, checked as a profile's are (unknown keys refused)."""
    from apt.core.config import ConfigError
    from apt.core.config.model_resolution import resolve_model_config
    try:
        return resolve_model_config(ModelConfig(), data)
    except ConfigError as exc:
        raise PretrainedError(f"{where}: {exc}") from None


def _describe(path: Path) -> str:
    if not path.exists():
        return "no such file or directory"
    if not path.is_dir():
        return "a file, not a directory"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not names:
        return "an empty directory"
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
