"""Import: a Hugging Face directory (a ``SUPPORTED`` family, safetensors weights) -> a one-process
``APTModel``; ``import_hf_to_weights`` saves it as a ``dist_checkpointing`` directory that any
layout starts from (``training.init_from``).

The model class comes from the caller (``import_hf(path, APTModel)``): interop sits below
``apt/model``, which imports it for ``APTModel.from_pretrained``."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from apt.core.config import ConfigError, ModelConfig
from apt.core.config.sizing import count_parameters
from .hf_config_reader import model_config_from_hf
from .hf_files import read_json, read_safetensors, safetensors_files
from .hf_weights import hf_to_megatron


def import_hf(hf_dir: str | Path, model_class):
    """Build a one-process fp32 ``model_class`` (``APTModel`` or a subclass) holding an HF
    directory's weights (``SUPPORTED`` families). Returns ``(ModelConfig, model)``.

    Everything read is checked before anything large is allocated: config.json maps to a
    validated ModelConfig (or one line naming what APT cannot represent), the weight files
    are listed, and the memory the import needs is compared with what the machine has."""
    hf_dir = Path(hf_dir)
    hf = read_json(hf_dir / "config.json")
    cfg = model_config_from_hf(hf, hf_dir / "config.json")
    files = safetensors_files(hf_dir)
    preflight_memory(cfg, hf_dir)
    model = model_class(cfg)
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    state = hf_to_megatron(read_safetensors(hf_dir, files), cfg, hf["model_type"])
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


def import_hf_to_weights(hf_dir: str | Path, out_dir: str | Path, model_class) -> ModelConfig:
    """Import ``hf_dir`` into a ``model_class`` (``APTModel``) and save it as a
    ``dist_checkpointing`` weights directory that any layout loads
    (``training.init_from=out_dir``)."""
    from apt.trainops.checkpoints import save_model_weights
    cfg, model = import_hf(hf_dir, model_class)
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
    needed = 2 * 4 * count_parameters(cfg).total
    available = psutil.virtual_memory().available if available is None else available
    if needed > available:
        raise ConfigError(f"{where}: importing this model needs about {needed / 2**30:,.1f} GiB "
                          f"(fp32 model + weights read, {count_parameters(cfg).total:,} "
                          f"parameters), {available / 2**30:,.1f} GiB is available")
