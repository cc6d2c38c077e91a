"""The engines' forward-only schedule: one pass over micro-batches on any layout, Megatron's own.

``get_forward_backward_func()`` with ``forward_only=True`` feeds the micro-batches through the
pipeline stages (a plain loop when PP = 1, the interleaved schedule over virtual stages), as a
training step does without the backward pass. The Evaluator, the preference reference pass
(apt/trainops/objectives/reference.py), the engines and the RL sampler and rollouts use it, so
a statistic computed without gradients is computed the same way on every layout.
"""
from __future__ import annotations

import torch


def forward_only(chunks, batches: list, step_fn) -> list[dict]:
    """Run ``batches`` through the model ``chunks`` (this rank's virtual stages) without
    gradients. ``step_fn(model, batch)`` returns (output, stats_fn); the last pipeline stage
    returns ``stats_fn(output)`` (a dict of tensors) per micro-batch, other stages an empty
    list. Every batch must have one ``model_shape`` (the pipeline's activation shape)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    if not batches:
        return []
    chunks = list(chunks)
    device = next(chunks[0].parameters()).device

    def forward_step(data_iterator, model):
        output, stats_fn = step_fn(model, next(data_iterator))
        # (loss, dict) form: the schedule scales the loss, we only keep the dict.
        return output, lambda out: (torch.zeros((), device=device), stats_fn(out))

    micro, seq = batches[0].model_shape
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches),
            model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(batches),
            seq_length=seq, micro_batch_size=micro, forward_only=True)
    return [o for o in outputs if isinstance(o, dict)]


def lockstep_group(plan):
    """The ranks whose forward passes must run together outside a training step (evaluation,
    sampling): under ZeRO-3 every forward pass gathers the parameters over the data-parallel
    group, so those ranks take part in each other's passes; None on other layouts."""
    if not plan.zero3_partitioned:
        return None
    from megatron.core import parallel_state
    return parallel_state.get_data_parallel_group()
