"""Monitoring: callbacks the Trainer registers from ``config.monitoring``.

Order matters: PerformanceMonitor enriches the step records first, then the caller's own
callbacks, then run artifacts and the backends, which write what the records hold by then.
metrics.jsonl is always written (by the Trainer, after the callbacks).
"""
from __future__ import annotations

from .backend import MetricsBackend
from .performance import PerformanceMonitor, memory_stats
from .run_artifacts import RunArtifacts


def build_callbacks(config, extra=()) -> list:
    from .mlflow_backend import MLflowBackend
    from .tensorboard import TensorBoardBackend
    from .wandb_backend import WandbBackend
    mon = config.monitoring
    callbacks = [PerformanceMonitor(), *extra, RunArtifacts(plots=mon.plots)]
    if mon.tensorboard:
        callbacks.append(TensorBoardBackend())
    if mon.wandb:
        callbacks.append(WandbBackend())
    if mon.mlflow:
        callbacks.append(MLflowBackend())
    return callbacks


__all__ = ["MetricsBackend", "PerformanceMonitor", "RunArtifacts", "build_callbacks",
           "memory_stats"]
