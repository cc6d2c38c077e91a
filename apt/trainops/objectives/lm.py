"""Next-token prediction: pretraining and supervised fine-tuning.

One objective for both: the loss is the cross-entropy of every label the batch's loss mask
selects. Pretraining data masks nothing; SFT data masks everything but the assistant's tokens
(apt/trainops/data/sft.py), so the objective needs no SFT-specific code.
"""
from __future__ import annotations

from functools import partial

import torch

from apt.trainops.data.datasets.batches import LMBatch
from .token_metrics import TOKEN_METRICS, metrics_from_totals, token_totals
from .base import Objective


def lm_output(model, batch: LMBatch, labels: bool = True,
              loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token loss [b, s] (``labels``: Megatron's vocab-parallel cross-entropy) or logits
    [b, s, V / TP]; the batch's positions and document mask go to the model. ``loss_mask``:
    the weights the caller multiplies the per-token loss by before summing (Megatron's forward
    takes it; the fused output loss then computes its gradient in the forward pass)."""
    extra = {} if loss_mask is None else {"loss_mask": loss_mask}
    return model(batch.tokens, batch.position_ids, batch.attention_mask,
                 labels=batch.labels if labels else None, **extra)


class LanguageModelObjective(Objective):
    name = "lm"
    batch_type = LMBatch
    stat_names = ("loss",)
    eval_stat_names = ("loss_sum", "correct", "tokens")

    def loss_units(self, batch: LMBatch) -> torch.Tensor:
        return batch.loss_mask.sum()

    def forward_step(self, model, batch: LMBatch):
        self.check_model(model, batch)
        return (lm_output(model, batch, loss_mask=batch.loss_mask),
                partial(self._loss, batch.loss_mask))

    @staticmethod
    def _loss(loss_mask, per_token):
        loss_sum = (per_token.float() * loss_mask).sum()
        return loss_sum, {"loss": loss_sum.detach().clone()}

    def eval_forward_step(self, model, batch: LMBatch):
        self.check_model(model, batch)
        return lm_output(model, batch, labels=False), partial(self._eval_stats, model, batch)

    @staticmethod
    def _eval_stats(model, batch, logits):
        loss_sum, correct, tokens = token_totals(model, logits, batch.labels, batch.loss_mask)
        return {"loss_sum": loss_sum, "correct": correct, "tokens": tokens}

    def eval_metrics(self, sums: dict, wanted=TOKEN_METRICS) -> dict:
        return metrics_from_totals(sums["loss_sum"], sums["correct"], sums["tokens"],
                                   [m for m in wanted if m in TOKEN_METRICS] + ["loss"])
