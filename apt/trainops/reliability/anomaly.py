"""The anomaly guard: a step whose loss or gradient norm is not finite, or whose loss spikes,
changes no weight, and every rank decides so alike.

Between the backward pass and the optimizer update, each engine calls ``before_update`` once
(``RunControl.vote`` in run_control.py: the step's one all-reduce, which also carries the
preemption and checkpoint-writer flags): it sums every rank's loss statistics and a
"non-finite here" flag over all ranks, so every rank sees the same global loss and the same
verdict. The gradient norm is already global (the optimizer all-reduced it). On an anomaly the
update is dropped (engines/base.py's ``updates_dropped``: the optimizer's inner step does nothing, so weights and
Adam moments stay as they were); then the policy (``training.anomaly``) applies:

- skip: the step counts as done: the step counter, the learning-rate schedule (a function of
  the step) and the data cursor move on; Adam's own step count does not (bias correction
  continues as if the step had not happened);
- rewind: the run reloads its last committed checkpoint (weights, optimizer, RNGs, step) and
  continues on the data after the anomalous batch: the batches since that checkpoint are
  skipped (the data cursor is no longer step x global batch, and checkpoints record it);
- stop: the run exits with EXIT_ANOMALY (apt/core/exit_codes.py) and one line.

Any policy stops once ``max_anomalies`` anomalies happened. A checkpoint is never written from
non-finite weights (``check_weights_finite`` before every save).
"""
from __future__ import annotations

import math
from collections import deque

import torch

from apt.trainops.runtime.process_groups import ranks_raising


class AnomalyStop(RuntimeError):
    """Raised on every rank alike when the policy or the anomaly count ends the run."""


class AnomalyGuard:
    def __init__(self, cfg, fp16: bool = False):
        self.cfg = cfg
        self.enabled = cfg.policy != "off"
        # With fp16 a non-finite gradient norm is the dynamic loss scale's overflow, which the
        # optimizers skip and rescale themselves: routine, not an anomaly.
        self.fp16 = fp16
        self.recent = deque(maxlen=cfg.window)   # losses of the last normal steps
        self.count = 0

    def classify(self, loss: float, grad_norm: float | None) -> str | None:
        """Why this step is anomalous, or None. Same inputs on every rank, same answer."""
        if not self.enabled:
            return None
        if not math.isfinite(loss):
            return f"non-finite loss ({loss})"
        if self.grad_norm_anomaly(grad_norm):
            return self.grad_norm_anomaly(grad_norm)
        z = self.zscore(loss)
        if z is not None and z > self.cfg.spike_zscore:
            return (f"loss spike {loss:.4f} (z-score {z:.1f} over the last {len(self.recent)} "
                    f"steps, limit {self.cfg.spike_zscore:g})")
        return None

    def grad_norm_anomaly(self, grad_norm: float | None) -> str | None:
        if not self.enabled or grad_norm is None or math.isfinite(grad_norm) or self.fp16:
            return None
        return f"non-finite gradient norm ({grad_norm})"

    def zscore(self, loss: float) -> float | None:
        if self.cfg.spike_zscore is None or len(self.recent) < self.cfg.window:
            return None
        mean = sum(self.recent) / len(self.recent)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.recent) / (len(self.recent) - 1))
        return (loss - mean) / std if std > 0 else None

    def record(self, loss: float, anomaly: str | None) -> None:
        if anomaly is None:
            self.recent.append(loss)
        else:
            self.count += 1

    def must_stop(self) -> bool:
        return self.cfg.policy == "stop" or self.count >= self.cfg.max_anomalies


def check_weights_finite(modules, step: int) -> None:
    """Collective: raise AnomalyStop on every rank if any rank holds a non-finite weight (a
    checkpoint must never keep one)."""
    bad = False
    with torch.no_grad():
        for module in modules:
            for param in module.parameters():
                data = getattr(param, "ds_tensor", param)   # ZeRO-3: this rank's partition
                if not bool(torch.isfinite(data).all()):
                    bad = True
                    break
    count, = ranks_raising(bad)
    if count:
        raise AnomalyStop(f"weights are not finite on {count} rank(s) at step {step}: the "
                          f"checkpoint is not written")
