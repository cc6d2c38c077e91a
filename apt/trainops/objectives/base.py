"""What every objective is: a typed batch in, a loss out, in the shape Megatron's schedules call.

An objective knows its batch type, how to run the model on one micro-batch and turn the output
into a loss, and which statistics it reports. It knows nothing about engines, data parallelism
or accumulation: the engines (apt/trainops/distributed/engines) and the Evaluator call it the
same way on every layout.

The loss is a *sum* over the objective's units (tokens for language modelling, pairs for
preference losses). The engine divides by the number of units in the whole global batch (every
micro-batch on every data-parallel rank), so the gradient of a step is the gradient of one
mean over the global batch, whatever the micro-batch split: gradient accumulation is exact for
variable-length data, which a mean of per-micro-batch means is not.
"""
from __future__ import annotations

from typing import Callable

import torch

from apt.trainops.data.datasets.batches import LMBatch, require_supported

# loss_func(output) -> (loss summed over this micro-batch's units, {stat name: summed value})
LossFunc = Callable[[torch.Tensor], tuple[torch.Tensor, dict]]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DeepSpeed / Megatron DDP / Float16Module wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


class Objective:
    name: str = "objective"
    batch_type = LMBatch
    # Statistics the loss function returns, summed over micro-batches and data-parallel ranks
    # before ``step_metrics`` turns them into logged values. Declared up front: pipeline stages
    # that compute no loss still take part in reducing them.
    stat_names: tuple[str, ...] = ("loss",)
    eval_stat_names: tuple[str, ...] = ()
    # The frozen copy of the initial weights the loss compares against (reference.py
    # FrozenReference, kept by ``bind``), or None: objectives without one, or once released.
    reference = None

    @property
    def needs_reference(self) -> bool:
        """Whether the loss compares against a reference's log-probabilities (``logps_step``
        of the reference weights, live or precomputed)."""
        return False

    def coerce(self, batch):
        """The typed batch (a plain dict from a user's dataset is checked field by field)."""
        if isinstance(batch, self.batch_type):
            return batch
        if isinstance(batch, dict):
            return self.batch_type.from_dict(batch)
        raise TypeError(f"objective {self.name!r} takes {self.batch_type.__name__} batches, "
                        f"got {type(batch).__name__}")

    def check_model(self, model, batch) -> None:
        """Refuse batch fields the model cannot honour (position ids, attention masks)."""
        inner = unwrap(model)
        require_supported(batch, set(getattr(inner, "supported_batch_fields", ())),
                          type(inner).__name__)

    # -- around the loop -----------------------------------------------------------------
    def bind(self, modules) -> None:
        """Called once the model holds its initial weights (after ``init_from`` and LoRA,
        before a resume loads trained ones): e.g. to keep them as a frozen reference."""

    def prepare(self, micro_batches: list, run_forward) -> list:
        """The step's (or evaluation's) micro-batches before their forward passes; may fill
        fields from a pass of its own: ``run_forward(batches, step_fn)`` is the layout's
        forward-only pass (apt/trainops/distributed/engines/forward_only.py), collective like
        a step."""
        return micro_batches

    def state_dict(self) -> dict:
        """What a training checkpoint's state.json records about the objective."""
        return {}

    def check_resumed(self, state: dict, where: str, same_layout: bool) -> None:
        """Refuse to resume when the objective's fixed parts differ from the checkpoint's."""

    # -- training ----------------------------------------------------------------------
    def loss_units(self, batch) -> torch.Tensor:
        """How many units this micro-batch's loss sums over (the global normaliser's share)."""
        raise NotImplementedError

    def forward_step(self, model, batch) -> tuple[torch.Tensor, LossFunc]:
        """Run ``model`` on one micro-batch: (output, loss_func), as Megatron's schedules call."""
        raise NotImplementedError

    def step_metrics(self, sums: dict, units: float) -> dict:
        """Logged values of one optimizer step from its global sums and unit count."""
        return {name: value / max(units, 1.0) for name, value in sums.items()}

    # -- passes without gradients (a reference's or the old policy's log-probabilities) --
    def logps_step(self, model, batch) -> tuple[torch.Tensor, Callable]:
        """Forward step of a pass without gradients, run through the layout's forward-only
        schedule: (output, stats_func), stats_func(output) -> {"logps": tensor} per
        micro-batch, the log-probabilities the loss compares against (a preference pair's
        answers [b, 2]; a rollout's completion tokens [b, s]). Objectives without a reference
        or an old policy have none."""
        raise NotImplementedError(f"objective {self.name!r} has no log-probability pass")

    # -- evaluation --------------------------------------------------------------------
    def evaluate(self, evaluator, max_batches: int | None) -> dict:
        """This objective's held-out metrics, unprefixed (the Trainer logs them as
        ``val_<name>``); collective, every rank returns the same numbers. ``evaluator``
        (apt/trainops/eval/evaluator.py) holds this rank's model ``chunks``, the held-out
        ``dataloader``, the ``tokenizer`` and the ``lockstep_group``. The default is the
        forward pass: ``evaluator.forward_statistics(max_batches)`` runs ``prepare`` and
        ``eval_forward_step`` over at most ``max_batches`` micro-batches per data-parallel rank
        and turns the summed statistics into ``eval_metrics``. An objective measured otherwise
        overrides this (GRPO: greedy answers to held-out prompts, scored by its rewards)."""
        return evaluator.forward_statistics(max_batches)

    def eval_forward_step(self, model, batch) -> tuple[torch.Tensor, Callable]:
        """(output, stats_func): stats_func(output) -> {eval stat name: float64 sum}, one per
        ``eval_stat_names`` (the forward-pass evaluation)."""
        raise NotImplementedError(f"objective {self.name!r} has no forward-pass evaluation")

    def eval_metrics(self, sums: dict, wanted) -> dict:
        """The forward-pass evaluation's metrics from its global sums (``wanted``: the metric
        names the Evaluator was asked for, which an objective may narrow to)."""
        raise NotImplementedError(f"objective {self.name!r} has no forward-pass evaluation")
