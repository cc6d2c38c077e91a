"""Profiles: typed, strict, inherited (``extends:``), overridable (``--set``), hashed."""
from .errors import ConfigError
from .loader import config_hash, config_to_dict, find_profile, load_profile, with_overrides
from .schema import (APTConfig, CheckpointConfig, DataConfig, DPOConfig, DistributedConfig, FinetuneConfig,
                     GRPOConfig,
                     HardwareConfig, ModelConfig, MonitoringConfig, OutputConfig, TrainingConfig)

__all__ = ["APTConfig", "CheckpointConfig", "ConfigError", "DataConfig", "DistributedConfig",
           "DPOConfig", "GRPOConfig",
           "FinetuneConfig", "HardwareConfig", "ModelConfig", "MonitoringConfig", "OutputConfig",
           "TrainingConfig",
           "config_hash", "config_to_dict", "find_profile", "load_profile", "with_overrides"]
