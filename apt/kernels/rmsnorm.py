"""RMSNorm: ``y = x / sqrt(mean(x^2) + eps) * weight`` over the last dimension."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def eager_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of ``x`` [..., h] with ``weight`` [h], differentiable in both."""
    return eager_rms_norm(x, weight, eps)
