"""The optimizer of the hand-written reference loops (bench/trainer_overhead.py,
bench/peer_hf.py): torch AdamW with APT's settings (no decay on norms and biases) and APT's
warmup + cosine schedule, so those loops differ from the Trainer only in what they measure."""
from __future__ import annotations

import torch

from apt.trainops.trainers.schedule import warmup_cosine


def plain_adamw(model: torch.nn.Module, t) -> tuple[torch.optim.Optimizer, object]:
    """(AdamW, its LambdaLR schedule) for ``model`` from ``t``: a TrainingConfig."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                  eps=t.adam_eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(
        s, max_steps=t.max_steps, warmup_steps=t.warmup_steps, lr=t.learning_rate,
        min_lr=t.min_learning_rate) / t.learning_rate)
    return optimizer, schedule
