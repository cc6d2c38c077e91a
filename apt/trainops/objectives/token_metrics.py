"""Token-level evaluation metrics, correct under tensor parallelism.

Under TP the output layer's logits are sharded over the vocabulary ([b, s, V / TP] per rank), so
neither the argmax nor the cross-entropy can be taken locally. The loss comes from the model's
own vocab-parallel cross-entropy (``compute_language_model_loss``); the argmax is a max and an
index reduced over the TP group. With TP = 1 the same code is the plain computation.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

TOKEN_METRICS = ("loss", "perplexity", "bits_per_token", "accuracy")


def _tp_group_and_rank():
    from megatron.core import parallel_state
    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        return (parallel_state.get_tensor_model_parallel_group(),
                parallel_state.get_tensor_model_parallel_rank(),
                parallel_state.get_tensor_model_parallel_world_size())
    return None, 0, 1


def vocab_parallel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Global argmax over a vocab-sharded last dimension (ties: the smallest token id)."""
    group, rank, size = _tp_group_and_rank()
    local_max, local_index = logits.float().max(dim=-1)
    index = local_index + rank * logits.shape[-1]
    if size == 1:
        return index
    global_max = local_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    sentinel = torch.full_like(index, torch.iinfo(index.dtype).max)
    candidate = torch.where(local_max == global_max, index, sentinel)
    dist.all_reduce(candidate, op=dist.ReduceOp.MIN, group=group)
    return candidate


def per_token_loss(model, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy [b, s] from the model's own (vocab-parallel) loss; logits are [b, s, V/TP]."""
    from megatron.core.utils import get_attr_wrapped_model
    compute = get_attr_wrapped_model(model, "compute_language_model_loss")
    return compute(labels, logits.transpose(0, 1).contiguous())


def token_totals(model, logits, labels, loss_mask) -> torch.Tensor:
    """float64 [loss sum, correct next tokens, tokens] over the unmasked positions."""
    mask = loss_mask.double()
    loss = per_token_loss(model, logits, labels).double()
    correct = (vocab_parallel_argmax(logits) == labels).double()
    return torch.stack([(loss * mask).sum(), (correct * mask).sum(), mask.sum()])


def metrics_from_totals(loss_sum: float, correct: float, tokens: float,
                        metrics=TOKEN_METRICS) -> dict:
    """Token metrics from summed statistics (sums reduce exactly over ranks; means do not)."""
    loss = loss_sum / max(tokens, 1)
    values = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
              "bits_per_token": loss / math.log(2), "accuracy": correct / max(tokens, 1)}
    out = {name: values[name] for name in metrics if name in values}
    out["tokens"] = int(tokens)
    return out


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor,
                    loss_mask: torch.Tensor | None = None, metrics=TOKEN_METRICS) -> dict:
    """Loss, perplexity, bits/token and next-token accuracy from full (unsharded) logits
    [b, s, V] and labels [b, s]: the single-device definition the Evaluator reproduces."""
    logits = logits.double()
    mask = torch.ones_like(labels, dtype=torch.float64) if loss_mask is None else loss_mask.double()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                             reduction="none").view_as(mask)
    correct = (logits.argmax(-1) == labels).double()
    return metrics_from_totals(float((loss * mask).sum()), float((correct * mask).sum()),
                               float(mask.sum()), metrics)
