"""The global gradient norm and clipping by it, for an engine whose optimizer does neither.

DeepSpeed's ZeRO-0 fp32 path hands the gradients to a plain torch optimizer: it clips them
(``clip_fp32_gradients``) but drops the norm it computed, so the run could not log it or guard
on it. The DeepSpeed engine turns DeepSpeed's clipping off there and calls this instead, with
the same formula as ZeRO's and Megatron's clipping (``max_norm / (norm + 1e-6)`` when below 1),
so a one-process run and a data-parallel ZeRO-1 run clip alike.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate

EPS = 1.0e-6


def clip_by_global_norm(params: list[torch.nn.Parameter], max_norm: float,
                        model_parallel_group=None) -> float:
    """The L2 norm of all gradients (each counted once over tensor-parallel ranks: a weight
    every TP rank holds whole is counted on one), then the gradients scaled in place so that
    their norm is at most ``max_norm`` (0: no clipping). Data-parallel ranks hold the same
    reduced gradients, so need no reduction. Returns the norm before clipping (inf or nan
    when a gradient is not finite; nothing is scaled then)."""
    grads = [p.grad for p in params if p.grad is not None]
    counted = [p.grad for p in params
               if p.grad is not None and param_is_not_tensor_parallel_duplicate(p)]
    squares = (torch.stack(torch._foreach_norm(counted)).double().square().sum() if counted
               else torch.zeros((), dtype=torch.float64))
    if model_parallel_group is not None and dist.get_world_size(model_parallel_group) > 1:
        dist.all_reduce(squares, group=model_parallel_group)
    norm = math.sqrt(float(squares))   # one host sync: the step's update depends on it anyway
    if max_norm > 0 and math.isfinite(norm):
        coefficient = max_norm / (norm + EPS)
        if coefficient < 1.0:
            torch._foreach_mul_(grads, coefficient)
    return norm
