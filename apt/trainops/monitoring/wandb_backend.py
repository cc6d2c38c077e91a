"""Weights & Biases: online with credentials, otherwise an offline run directory.

Offline runs land in <run dir>/wandb/offline-run-*/ and upload later with
``wandb sync <that directory>``; no network is touched. ``monitoring.wandb_mode`` forces a mode.
"""
from __future__ import annotations

import netrc
import os

from .backend import MetricsBackend


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(configured: str) -> str:
    if os.environ.get("WANDB_MODE") in ("offline", "online", "disabled") and configured == "auto":
        return os.environ["WANDB_MODE"]
    if configured == "auto":
        return "online" if has_wandb_credentials() else "offline"
    return configured


class WandbBackend(MetricsBackend):
    name = "wandb"

    def open(self, run_dir, trainer) -> None:
        import wandb
        from apt.core.config import config_to_dict
        mon = trainer.config.monitoring
        self.mode = resolve_mode(mon.wandb_mode)
        self.run = wandb.init(
            project=mon.wandb_project, entity=mon.wandb_entity, name=run_dir.name,
            dir=str(run_dir), mode=self.mode, config=config_to_dict(trainer.config),
            tags=[trainer.config.name, trainer.config.config_hash], reinit="create_new",
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True))

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, summary: dict) -> None:
        for key, value in summary.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.run.summary[f"final/{key}"] = value
        self.run.finish()
