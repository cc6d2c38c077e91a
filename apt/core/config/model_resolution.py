"""A ModelConfig with keyword overrides applied, checked as a profile's ``model:`` section is.

Pure config logic, so it sits under everything that needs it: the model's constructor
(``APTModel(hidden_size=...)``), the HF config reader and ``from_pretrained``'s saved configs."""
from __future__ import annotations

import dataclasses

from .errors import ConfigError
from .schema import APTConfig, ModelConfig, cross_checks


def resolve_model_config(base: ModelConfig, overrides: dict) -> ModelConfig:
    """Apply keyword overrides with the same checks a profile gets."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"unknown model argument(s) {', '.join(unknown)}", key="model")
    config = dataclasses.replace(base, **overrides)
    for key, message in cross_checks(APTConfig(model=config)):
        if key.startswith("model."):
            raise ConfigError(message, key=key)
    return config
