"""The typed schema of an APT profile, one module per section.

Every section is a frozen dataclass. Field metadata carries the value rules (``gt``, ``ge``,
``le``, ``choices``; ``rules.py``) so that one generic validator (``validate.py``) checks every
profile the same way and names the key that is wrong. Rules that relate several keys live with
the section they check (``profile.cross_checks`` runs them in order); rules that need the world
size live in the parallel plan.
"""
from .data import AUGMENTATIONS, BYTE_VOCAB, DataConfig
from .model import LORA_TARGETS, LoRAConfig, ModelConfig
from .objectives import DPO_LOSSES, DPOConfig, GRPOConfig
from .output import MonitoringConfig, OutputConfig
from .parallel import DistributedConfig, HardwareConfig
from .profile import KEY_ALIASES, APTConfig, cross_checks
from .rules import rule
from .run_control import AnomalyConfig, CheckpointConfig, TargetConfig, WatchdogConfig
from .training import FinetuneConfig, TrainingConfig

__all__ = ["APTConfig", "AUGMENTATIONS", "AnomalyConfig", "BYTE_VOCAB", "CheckpointConfig",
           "DPOConfig", "DPO_LOSSES", "DataConfig", "DistributedConfig", "FinetuneConfig",
           "GRPOConfig", "HardwareConfig", "KEY_ALIASES", "LORA_TARGETS", "LoRAConfig",
           "ModelConfig", "MonitoringConfig", "OutputConfig", "TargetConfig", "TrainingConfig",
           "WatchdogConfig", "cross_checks", "rule"]
