"""Objectives: the one seam between a trainer variant and the loop (see base.py).

``training.objective`` or a trainer class picks one by name; engines and the Evaluator take the
object and never ask which it is."""
from __future__ import annotations

from .base import Objective, unwrap
from .lm import LanguageModelObjective, lm_output
from .preference import PreferenceObjective

OBJECTIVES = {"lm": LanguageModelObjective, "dpo": PreferenceObjective}


def build_objective(spec="lm", config=None) -> Objective:
    """An Objective from a name (``training.objective``) or an instance (returned as is);
    ``config`` (an APTConfig) supplies the objective's own section (``training.dpo``)."""
    if isinstance(spec, Objective):
        return spec
    if spec not in OBJECTIVES:
        raise ValueError(f"unknown objective {spec!r}; known: {', '.join(sorted(OBJECTIVES))}")
    if spec == "dpo":
        return PreferenceObjective(config.training.dpo if config is not None else None)
    return OBJECTIVES[spec]()


__all__ = ["LanguageModelObjective", "OBJECTIVES", "Objective", "PreferenceObjective",
           "build_objective", "lm_output", "unwrap"]
