"""Weights from elsewhere into an APT model, and APT's weights for others: ``from_pretrained``
(a run directory, a dist_checkpointing weights directory, a Hugging Face directory) and the
Hugging Face export and import.

A layer above checkpoint I/O (``apt/trainops/checkpoints``) and below the model definition
(``apt/model``), which imports it: ``APTModel.from_pretrained`` delegates to ``load_pretrained``.
Nothing here imports ``apt/model``; what builds a model takes its class from the caller
(``import_hf(path, APTModel)``, ``export_hf(weights_dir, ..., model_class=APTModel)``), and the
config logic it shares with the model lives in ``apt/core/config`` (``model_resolution``,
``sizing``).

- ``pretrained.py``: what a path holds, recognised by its files, loaded into a model;
- ``hf_families.py``: which HF family holds a ModelConfig, and its transformers config;
- ``hf_config_reader.py``: config.json -> ModelConfig, refusing what APT cannot represent;
- ``hf_weights.py``: tensor names and shapes, Megatron <-> HF, per family;
- ``hf_files.py``: config.json and safetensors files, read as data;
- ``hf_export.py`` / ``hf_import.py``: the two directions, end to end.
"""
from .hf_config_reader import SUPPORTED, model_config_from_hf
from .hf_export import export_hf, find_weights_dir, hf_eos_ids
from .hf_families import hf_config, hf_family
from .hf_files import HF_INDEX, HF_WEIGHTS
from .hf_import import import_hf, import_hf_to_weights, preflight_memory, profile_model_fields
from .hf_weights import hf_to_megatron, megatron_to_hf
from .pretrained import PretrainedError, load_pretrained

__all__ = ["HF_INDEX", "HF_WEIGHTS", "PretrainedError", "SUPPORTED", "export_hf",
           "find_weights_dir", "hf_config", "hf_eos_ids", "hf_family", "hf_to_megatron",
           "import_hf", "import_hf_to_weights", "load_pretrained", "megatron_to_hf",
           "model_config_from_hf", "preflight_memory", "profile_model_fields"]
