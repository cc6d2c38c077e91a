"""Objectives: the one seam between a trainer variant and the loop (see base.py).

``training.objective`` or a trainer class picks one by name; engines and the Evaluator take the
object and never ask which it is."""
from __future__ import annotations

from .base import Objective, unwrap
from .lm import LanguageModelObjective, lm_output
from .grpo import GRPOObjective
from .preference import PreferenceObjective

OBJECTIVES = {"lm": LanguageModelObjective, "dpo": PreferenceObjective, "grpo": GRPOObjective}


def build_objective(spec="lm", config=None) -> Objective:
    """An Objective from a name (``training.objective``) or an instance (returned as is);
    ``config`` (an APTConfig) supplies the objective's own section (``training.dpo``)."""
    if isinstance(spec, Objective):
        return spec
    if spec not in OBJECTIVES:
        raise ValueError(f"unknown objective {spec!r}; known: {', '.join(sorted(OBJECTIVES))}")
    if spec == "dpo":
        return PreferenceObjective(config.training.dpo if config is not None else None)
    if spec == "grpo":
        raise ValueError("training.objective 'grpo' learns from rollouts the O1Trainer samples "
                         "(apt.trainops.trainers.O1Trainer; launch/train.py picks it)")
    return OBJECTIVES[spec]()


__all__ = ["GRPOObjective", "LanguageModelObjective", "OBJECTIVES", "Objective", "PreferenceObjective",
           "build_objective", "lm_output", "unwrap"]
