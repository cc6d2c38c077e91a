"""The one place that turns a plan into an engine (``plan.engine``)."""
from __future__ import annotations

from .base import StepResult, TrainEngine


def build_engine(modules, cfg, plan, objective) -> TrainEngine:
    if plan.engine == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine
        return DeepSpeedEngine(modules, cfg, plan, objective)
    from .megatron_engine import MegatronEngine
    return MegatronEngine(modules, cfg, plan, objective)


__all__ = ["StepResult", "TrainEngine", "build_engine"]
