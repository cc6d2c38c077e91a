"""Hooks around the loop: monitoring and evaluation extras plug in here (the anomaly guard is
the loop's own: it must act between backward and update, reliability/anomaly.py).

Every rank calls every hook (a hook that writes files checks ``trainer.runtime.is_main``);
hooks may add keys to the records they receive before those are written to metrics.jsonl.

It sits under both the trainers (trainers/) that call it and the monitoring backends that implement
it, so neither package imports the other back (``from apt.trainops.trainers import Callback``, the
seed's path, still works).
"""
from __future__ import annotations


class Callback:
    def on_train_start(self, trainer) -> None:
        """After the engine and run directory exist, before the first step."""

    def on_step_start(self, trainer, step: int) -> None:
        """Before optimizer step ``step`` (0-based) runs its forward passes."""

    def on_log(self, trainer, records: list[dict]) -> None:
        """Once per log interval with one record per step since the last call."""

    def on_evaluate(self, trainer, result: dict) -> None:
        """After each evaluation; ``result`` has the step and the metrics."""

    def on_train_end(self, trainer, summary: dict) -> None:
        """After the final evaluation, before the summary is written."""
