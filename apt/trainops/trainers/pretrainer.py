"""PreTrainer: next-token pretraining, the seed's name for the plain loop."""
from __future__ import annotations

from apt.trainops.objectives import LanguageModelObjective
from .trainer import Trainer


class PreTrainer(Trainer):
    """``PreTrainer(model=..., train_dataset=...).pretrain()``: the Trainer with the
    language-model objective over every token (the profile's corpus by default)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("objective", LanguageModelObjective())
        super().__init__(*args, **kwargs)

    def pretrain(self) -> dict:
        return self.train()
