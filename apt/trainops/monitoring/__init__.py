"""Monitoring: callbacks the Trainer registers from ``config.monitoring``.

Order matters: PerformanceMonitor (and ExpertMetrics for MoE) enrich the step records first,
then the caller's own callbacks, then run artifacts and the backends, which write what the records hold by then.
metrics.jsonl is always written (by the Trainer, after the callbacks).
"""
from __future__ import annotations

from .backend import MetricsBackend
from .performance import PerformanceMonitor, memory_stats
from .run_artifacts import RunArtifacts


def _require(flag: str, module: str) -> None:
    import importlib.util
    from apt.core.config import ConfigError
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"needs the '{module}' package: pip install 'apt-trainops[monitoring]'",
                          key=f"monitoring.{flag}")


def build_callbacks(config, extra=()) -> list:
    """The Trainer's callbacks for ``config``; a backend switched on but not installed is a
    config error, raised when the Trainer is built (launch/train.py exits with code 2)."""
    from .mlflow_backend import MLflowBackend
    from .tensorboard import TensorBoardBackend
    from .wandb_backend import WandbBackend
    mon = config.monitoring
    for flag, module in (("tensorboard", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow")):
        if getattr(mon, flag):
            _require(flag, module)
    callbacks = [PerformanceMonitor(), *extra, RunArtifacts(plots=mon.plots)]
    if config.model.num_experts:   # before the artifacts and backends, which write the records
        from .expert_metrics import ExpertMetrics
        callbacks.insert(1, ExpertMetrics())
    if mon.tensorboard:
        callbacks.append(TensorBoardBackend())
    if mon.wandb:
        callbacks.append(WandbBackend())
    if mon.mlflow:
        callbacks.append(MLflowBackend())
    return callbacks


__all__ = ["MetricsBackend", "PerformanceMonitor", "RunArtifacts", "build_callbacks",
           "memory_stats"]
