"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr`` at ``max_steps``."""
from __future__ import annotations

import math


def warmup_cosine(step: int, *, max_steps: int, warmup_steps: int, lr: float,
                  min_lr: float) -> float:
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
