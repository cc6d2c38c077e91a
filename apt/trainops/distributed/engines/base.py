"""What the Trainer needs from an engine: one optimizer step over a global batch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass
class StepResult:
    loss: torch.Tensor            # this data-parallel rank's mean loss, on every rank
    grad_norm: float | None       # global gradient norm before clipping (None if unknown)
    loss_scale: float | None = None


def masked_mean_loss(per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over the unmasked tokens of one micro-batch."""
    return (per_token.float() * loss_mask).sum() / loss_mask.sum()


def model_forward(module: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Per-token loss [b, s] from an APTModel (Megatron GPTModel) for one micro-batch."""
    return module(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])


class TrainEngine:
    """Subclasses wrap model chunks and optimizer for one plan."""

    modules: list[torch.nn.Module]  # the unwrapped model chunks this rank holds (VP: several)

    def train_step(self, batches: Iterator[dict], lr: float) -> StepResult:
        raise NotImplementedError

    @staticmethod
    def set_lr(param_groups, lr: float) -> None:
        # The schedule is a pure function of the step (schedule.py): setting it each step needs
        # no scheduler state, so resuming at step N sets the same rate.
        for group in param_groups:
            group["lr"] = lr
