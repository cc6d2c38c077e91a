"""Goodput at scale: how much of the wall-clock trains, given failures and checkpoints.

Failures arrive as a Poisson process at ``rate_per_gpu_day`` x GPUs (default: Llama 3's 419
unexpected interruptions in 54 days on 16,384 H100s, hardware.yaml). A checkpoint costs
``save_s`` (checkpoint bytes / storage bandwidth); a failure costs the restart (``restart_s``
plus loading the checkpoint) and the work since the last checkpoint. Daly's higher-order
optimum interval (Daly 2006, "A higher order estimate of the optimum checkpoint interval for
restart dumps"; Young 1974 to first order: sqrt(2 x save x MTBF)) and his expected time per
segment, M e^{R/M} (e^{(tau+delta)/M} - 1), give the useful fraction tau / that.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .hardware import reliability

DAY = 86400.0


def default_rate_per_gpu_day() -> float:
    r = reliability()
    return r["interruptions"] / (r["days"] * r["gpus"])


def default_storage_bytes_s() -> float:
    return reliability()["storage_gbs"] * 1e9


@dataclass(frozen=True)
class Goodput:
    mtbf_s: float
    save_s: float
    restart_s: float
    interval_s: float          # compute time between checkpoints
    young_interval_s: float
    useful_fraction: float
    train_s: float             # failure-free time to the token budget
    wall_s: float

    def describe(self) -> str:
        h = 3600.0
        return "\n".join([
            f"failures     MTBF {self.mtbf_s / h:.2f} h for the job; checkpoint save "
            f"{self.save_s:.1f} s, restart + load {self.restart_s:.0f} s",
            f"checkpoint   every {self.interval_s / 60:.1f} min (Daly; Young "
            f"{self.young_interval_s / 60:.1f} min)",
            f"goodput      {self.useful_fraction:.1%} of wall-clock trains",
            f"budget       {self.train_s / DAY:.1f} days failure-free -> "
            f"{self.wall_s / DAY:.1f} days expected wall-clock"])


def daly_interval(save_s: float, mtbf_s: float) -> float:
    if save_s >= 2 * mtbf_s:
        return mtbf_s
    ratio = math.sqrt(save_s / (2 * mtbf_s))
    return math.sqrt(2 * save_s * mtbf_s) * (1 + ratio / 3 + save_s / (18 * mtbf_s)) - save_s


def goodput(*, gpus: int, checkpoint_bytes: float, train_s: float,
            rate_per_gpu_day: float | None = None, storage_bytes_s: float | None = None,
            restart_s: float = 600.0, interval_s: float | None = None) -> Goodput:
    """``restart_s``: scheduling, process start and warm-up before loading (not published by
    the runs above; 10 minutes by default). ``interval_s``: evaluate this interval instead of
    the optimum."""
    rate = default_rate_per_gpu_day() if rate_per_gpu_day is None else rate_per_gpu_day
    storage = storage_bytes_s or default_storage_bytes_s()
    mtbf = DAY / (rate * gpus) if rate > 0 else math.inf
    save = checkpoint_bytes / storage
    restart = restart_s + save                  # reading back at the same bandwidth
    if math.isinf(mtbf):
        return Goodput(mtbf, save, restart, math.inf, math.inf, 1.0, train_s, train_s)
    tau = interval_s or daly_interval(save, mtbf)
    segment = mtbf * math.exp(restart / mtbf) * math.expm1((tau + save) / mtbf)
    useful = tau / segment
    return Goodput(mtbf_s=mtbf, save_s=save, restart_s=restart, interval_s=tau,
                   young_interval_s=math.sqrt(2 * save * mtbf), useful_fraction=useful,
                   train_s=train_s, wall_s=train_s / useful)
