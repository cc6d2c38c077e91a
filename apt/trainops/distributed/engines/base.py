"""What the Trainer needs from an engine: one optimizer step over a global batch."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from .forward_only import forward_only
from apt.trainops.reliability import faults
from ..plan import Plan
from apt.trainops.reliability.watchdog import POSITION, set_phase

if TYPE_CHECKING:   # an annotation only: objectives sit above the engines' schedule
    from apt.trainops.objectives import Objective


@dataclass
class StepResult:
    sums: torch.Tensor            # [len(objective.stat_names)] float64: this data-parallel
                                  # rank's statistics summed over its micro-batches (every
                                  # pipeline stage holds them)
    units: torch.Tensor           # the global batch's loss units (all micro-batches and ranks)
    grad_norm: float | None       # global gradient norm before clipping (None if unknown)
    loss_scale: float | None = None


class TrainEngine:
    """Subclasses wrap model chunks and optimizer for one plan."""

    modules: list[torch.nn.Module]  # the unwrapped model chunks this rank holds (VP: several)
    objective: Objective
    plan: Plan

    def train_step(self, batches: Iterator, lr: float, before_update=None) -> StepResult:
        """One optimizer step over the next ``plan.grad_accum`` micro-batches (typed batches,
        on the device). ``before_update(sums, units, grad_norm)``, when given, is called once on
        every rank after the backward passes, before the update (``grad_norm``: the global
        norm, or None where the engine knows it only later); it returns whether to apply the
        update (the anomaly guard, reliability/anomaly.py)."""
        raise NotImplementedError

    def next_micro_batches(self, batches) -> list:
        """The step's ``plan.grad_accum`` micro-batches, prepared by the objective (e.g. the
        preference reference's log-probs, from a forward-only pass on this layout)."""
        micro_batches = [next(batches) for _ in range(self.plan.grad_accum)]
        return self.objective.prepare(micro_batches, partial(forward_only, self.modules))

    def global_units(self, micro_batches) -> torch.Tensor:
        """The loss units of the whole global batch: this rank's micro-batches summed over the
        data-parallel group (every pipeline stage holds the same batches, so gets the same)."""
        # float64: token counts of large global batches pass 2**24, where float32 stops counting
        units = torch.stack([self.objective.loss_units(b).double() for b in micro_batches]).sum()
        if self.plan.dp > 1:
            dist.all_reduce(units, group=parallel_state.get_data_parallel_group())
        return units

    def normalised(self, loss_func, units: torch.Tensor):
        """``loss_func`` with its summed loss turned into this micro-batch's share of the global
        mean. Both engines (DeepSpeed's backward, Megatron's schedule) divide a micro-batch's
        loss by the accumulation count and average gradients over data-parallel ranks: the
        factor undoes both, so the step's gradient is d(sum over the global batch) / units."""
        factor = self.plan.grad_accum * self.plan.dp

        def scaled(output):
            loss_sum, stats = loss_func(output)
            injected = faults.loss_factor(POSITION.batch)   # test-only: NaN or a spike
            if injected is not None:
                loss_sum = loss_sum * injected
                stats = {k: v * injected for k, v in stats.items()}
            set_phase("backward")   # the loss is the forward's last act; backward follows
            return loss_sum * (factor / units.clamp(min=1.0)).to(loss_sum.dtype), stats
        return scaled

    def stat_vector(self, stats: dict, device) -> torch.Tensor:
        return torch.stack([stats[name].detach().to(torch.float64)
                            for name in self.objective.stat_names]).to(device)

    def static_memory(self) -> dict:
        """Bytes this rank holds for weights, gradient buffers (None where they are transient)
        and optimizer state (fp32 master copies + moments): what the plan's estimate predicts."""
        raise NotImplementedError

    # Optimizer state in model space (apt/trainops/checkpoints/optimizer_state.py). Every
    # data-parallel rank calls these for the same parameters in the same order.
    def prepare_optimizer_state(self) -> None:
        """Make every parameter's optimizer state exist (before the first step it does not)."""
        ensure_adam_state(torch_optimizers(self.optimizer))

    def optimizer_step_count(self) -> int:
        for inner in torch_optimizers(self.optimizer):
            for slot in inner.state.values():
                if "step" in slot:
                    return int(slot["step"])
        return 0

    def optimizer_state_fragment(self, param):
        """What this rank holds of ``param``'s optimizer state: ``(group, start, tensors)``.

        ``group``: the data-parallel group the state is split over (or replicated on);
        ``start``: the offset of this rank's fragment in the flattened (TP-local) parameter, or
        None when every rank of the group holds all of it; ``tensors``: {"master", "exp_avg",
        "exp_avg_sq"} as the optimizer holds them (live: read, never keep), None when this rank
        holds no part. optimizer_state.py assembles each parameter on one rank from these."""
        raise NotImplementedError

    def load_full_optimizer_state(self, param, tensors: dict) -> None:
        raise NotImplementedError

    def loss_scaler_states(self) -> list[dict]:
        """fp16's dynamic loss scale, one state per optimizer (checkpoints/loss_scale.py);
        empty when there is none (bf16, fp32)."""
        return []

    def load_loss_scaler_states(self, states: list[dict]) -> None:
        pass

    def set_optimizer_step(self, step: int) -> None:
        """Adam's step count (bias correction) on every state slot."""
        for inner in torch_optimizers(self.optimizer):
            for slot in inner.state.values():
                slot["step"] = torch.tensor(float(step))

    @staticmethod
    def set_lr(param_groups, lr: float) -> None:
        # The schedule is a pure function of the step (schedule.py): setting it each step needs
        # no scheduler state, so resuming at step N sets the same rate.
        for group in param_groups:
            group["lr"] = lr


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside DeepSpeed / Megatron wrappers (Megatron chains one per
    parameter kind, e.g. dense and expert)."""
    if isinstance(optimizer, torch.optim.Optimizer) and not hasattr(optimizer, "optimizer"):
        return [optimizer]
    if hasattr(optimizer, "chained_optimizers"):
        return [o for inner in optimizer.chained_optimizers for o in torch_optimizers(inner)]
    return torch_optimizers(optimizer.optimizer)


def optimizer_state_bytes(optimizer) -> int:
    """Adam moments (and step counters) actually held by this rank."""
    return sum(tensor_bytes(state.values()) for opt in torch_optimizers(optimizer)
               for state in opt.state.values())


def ensure_adam_state(optimizers) -> None:
    """torch's AdamW creates its state on the first step; a run resuming before any step has
    none. Create it as zeros (Megatron's own fix steps on zero gradients, which applies weight
    decay to the weights)."""
    for inner in optimizers:
        for group in inner.param_groups:
            for flat in group["params"]:
                if not inner.state.get(flat):
                    inner.state[flat] = {"step": torch.tensor(0.0),
                                         "exp_avg": torch.zeros_like(flat),
                                         "exp_avg_sq": torch.zeros_like(flat)}


@contextlib.contextmanager
def updates_dropped(optimizer, drop: bool):
    """While active (when ``drop``), the torch optimizers inside ``optimizer`` (a DeepSpeed or
    Megatron wrapper) step nothing: the wrapper still clips, counts and copies, but no weight,
    master weight or Adam moment changes."""
    inners = torch_optimizers(optimizer) if drop else []
    for inner in inners:
        inner.step = lambda *args, **kwargs: None   # shadows the class's step
    try:
        yield
    finally:
        for inner in inners:
            del inner.step
