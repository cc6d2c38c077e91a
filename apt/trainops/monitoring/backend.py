"""The common shape of a monitoring backend: a callback that only rank 0 runs.

Step records become ``train/<key>``, evaluation results ``eval/<key>`` (the ``val_`` prefix
dropped); only finite numbers are sent (not the step, not the wall-clock time).
"""
from __future__ import annotations

import math
from pathlib import Path

from apt.trainops.callbacks import Callback

SKIP = {"step", "time"}


def numeric_metrics(record: dict, prefix: str) -> dict:
    out = {}
    for key, value in record.items():
        if key in SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            name = key[4:] if prefix == "eval" and key.startswith("val_") else key
            out[f"{prefix}/{name}"] = float(value)
    return out


class MetricsBackend(Callback):
    name = "backend"

    def __init__(self):
        self.active = False

    # What a backend implements.
    def open(self, run_dir: Path, trainer) -> None:
        raise NotImplementedError

    def log(self, metrics: dict, step: int) -> None:
        raise NotImplementedError

    def close(self, summary: dict) -> None:
        raise NotImplementedError

    # Callback hooks: rank 0 only.
    def on_train_start(self, trainer) -> None:
        if trainer.runtime.is_main:
            self.open(Path(trainer.artifacts.run_dir), trainer)
            self.active = True

    def on_log(self, trainer, records: list[dict]) -> None:
        if self.active:
            for record in records:
                self.log(numeric_metrics(record, "train"), record["step"])

    def on_evaluate(self, trainer, result: dict) -> None:
        if self.active:
            self.log(numeric_metrics(result, "eval"), result["step"])

    def on_train_end(self, trainer, summary: dict) -> None:
        if self.active:
            self.close(summary)
            self.active = False
