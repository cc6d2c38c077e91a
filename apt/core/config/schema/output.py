"""Where a run writes (``output:``) and which monitoring backends it feeds (``monitoring:``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from .rules import rule


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs"
    experiment_name: Optional[str] = None
    sample_tokens: int = rule(200, ge=0)
    sample_prompt: str = "def "


@dataclass(frozen=True)
class MonitoringConfig:
    """Backends besides the always-written metrics.jsonl; only rank 0 writes (monitoring/)."""
    tensorboard: bool = False          # event files in <run dir>/tensorboard
    wandb: bool = False
    wandb_project: str = "apt"
    wandb_entity: Optional[str] = None
    # auto: online when W&B credentials exist (WANDB_API_KEY or a netrc entry), else offline
    # (a run directory under <run dir>/wandb, uploadable later with `wandb sync`).
    wandb_mode: Literal["auto", "offline", "online"] = "auto"
    mlflow: bool = False
    # None: a SQLite store in the run directory (sqlite:///<run dir>/mlflow.db).
    mlflow_tracking_uri: Optional[str] = None
    mlflow_experiment: Optional[str] = None   # None: output.experiment_name or profile name
    plots: bool = True                 # PNG plots of loss, learning rate, throughput at the end
