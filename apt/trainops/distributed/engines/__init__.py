"""The one place that turns a plan into an engine (``plan.engine``)."""
from __future__ import annotations

from .base import StepResult, TrainEngine


def build_engine(modules, cfg, plan) -> TrainEngine:
    if plan.engine == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine
        return DeepSpeedEngine(modules, cfg, plan)
    from .megatron_engine import MegatronEngine
    return MegatronEngine(modules, cfg, plan)


__all__ = ["StepResult", "TrainEngine", "build_engine"]
