"""A ``GPTModel`` whose training loss can come from the fused linear + cross-entropy kernel.

Megatron's output layer materialises the logits [s, b, V / TP] and its cross-entropy then keeps
an fp32 copy of them for backward: at a 128k vocabulary that is the largest activation of the
model. With ``linear_cross_entropy`` among the model's kernels, a forward that is given labels
(training, and evaluation of the loss) hands the final hidden states and the output weight
straight to ``apt.kernels.linear_cross_entropy``, which returns the same per-token loss
[b, s] without those buffers (and, given the forward's ``loss_mask``, computes the gradient
in the same pass). Everything else (logits for evaluation metrics and sampling,
inference, multi-token prediction) takes Megatron's own path.

Tensor parallelism is handled as the output layer does it: the hidden states enter through the
same TP mapping (copy, or the sequence-parallel all-gather), whose backward sums the per-rank
partial input gradients the kernel returns for its vocabulary shard.
"""
from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)


class FusedOutputLossGPTModel(GPTModel):
    """``GPTModel`` + ``kernels``: the fused kernels this model uses (``apt.kernels.resolve``)."""

    def __init__(self, *args, kernels: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.kernels = tuple(kernels)

    def _fused_loss_applies(self, labels, kwargs) -> bool:
        inference = kwargs.get("inference_context") is not None and not self.training
        return ("linear_cross_entropy" in self.kernels and self.post_process
                and labels is not None and not inference
                and self.config.mtp_num_layers is None and not kwargs.get("mtp_in_postprocess"))

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        if not self._fused_loss_applies(labels, kwargs):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels,
                                        *args, **kwargs)
        from apt.kernels.linear_cross_entropy import linear_cross_entropy

        weight = (self.shared_embedding_or_output_weight()
                  if self.share_embeddings_and_output_weights else self.output_layer.weight)
        tp_group = self.pg_collection.tp
        if self.output_layer.sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(hidden_states, group=tp_group)
        elif torch.distributed.is_initialized() and tp_group.size() > 1:
            hidden_states = copy_to_tensor_model_parallel_region(hidden_states, group=tp_group)
        s, b, h = hidden_states.shape
        # The loss mask (Megatron's forward takes one), when the caller gave it: how the
        # per-token losses will be weighed, so the kernel can compute the gradient in its
        # forward pass (one walk over the logits instead of two).
        loss_mask = kwargs.get("loss_mask")
        per_token = linear_cross_entropy(
            hidden_states.reshape(s * b, h), weight,
            labels.transpose(0, 1).reshape(s * b),  # [b, s] -> [s, b], the hidden order
            tp_group=tp_group if tp_group.size() > 1 else None,
            weights=None if loss_mask is None else loss_mask.transpose(0, 1).reshape(s * b))
        return per_token.view(s, b).transpose(0, 1).contiguous()  # [b, s] like Megatron's
