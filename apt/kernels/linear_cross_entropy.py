"""The output projection and the cross-entropy in one: per-token ``logsumexp(h W^T) - (h W^T)[y]``
over the whole (vocabulary-parallel) vocabulary."""
from __future__ import annotations

import torch
from megatron.core import tensor_parallel


def eager_linear_cross_entropy(hidden, weight, labels, tp_group=None):
    logits = hidden @ weight.t()
    if tp_group is None or torch.distributed.get_world_size(tp_group) == 1:
        return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
    return tensor_parallel.vocab_parallel_cross_entropy(logits.float()[None], labels[None])[0]


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         tp_group=None) -> torch.Tensor:
    """Per-token loss [n] (fp32) of ``hidden`` [n, H] against ``labels`` [n] for the output
    weight shard ``weight`` [V / TP, H] (rank r holds rows r*V/TP...(r+1)*V/TP, Megatron's
    vocab-parallel layout). The gradient it gives ``hidden`` is this rank's partial sum: the
    caller's TP mapping (copy / sequence-parallel gather) reduces it, as for the output layer."""
    return eager_linear_cross_entropy(hidden, weight, labels, tp_group)
