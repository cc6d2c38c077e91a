"""What keeps a run going and says when it ends: ``training.checkpoints``, ``training.anomaly``,
``training.watchdog`` and ``training.target``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from .rules import rule


@dataclass(frozen=True)
class CheckpointConfig:
    save_interval: int = rule(500, ge=0)      # 0: no periodic checkpoints
    keep_last_n: int = rule(5, gt=0)
    # Also keep every checkpoint whose step is a multiple of this, forever (None: none).
    keep_every: Optional[int] = rule(None, gt=0)
    # Write in the background: the loop waits only while the state is copied to host memory.
    async_save: bool = True
    # Host memory per rank for optimizer state while resuming: the state is read this much at a
    # time (each rank keeps its own fragment of it).
    load_batch_mib: float = rule(1024.0, gt=0)
    # Default: <output.dir>/<experiment or profile name>-checkpoints (stable across restarts,
    # unlike the timestamped run directory, so auto-resume finds it).
    dir: Optional[str] = None
    # Resume from the newest verified checkpoint in `dir` when there is one.
    auto_resume: bool = False


@dataclass(frozen=True)
class AnomalyConfig:
    """The anomaly guard (apt/trainops/reliability/anomaly.py): what a step whose loss or gradient
    norm is not finite, or whose loss spikes, does. Every rank decides the same."""
    # off: no check; skip: the step's update is dropped (the step counter, learning rate and
    # data cursor move on); rewind: the update is dropped, the run reloads its last committed
    # checkpoint and continues on the data after the anomalous step; stop: the update is
    # dropped and the run exits (code 3).
    policy: Literal["off", "skip", "rewind", "stop"] = "skip"
    # Exit (code 3) at the anomaly after this many (skip and rewind).
    max_anomalies: int = rule(10, gt=0)
    # A loss more than this many standard deviations above the mean of the last `window`
    # normal steps is a spike. None: only non-finite values count.
    spike_zscore: Optional[float] = rule(None, gt=0)
    window: int = rule(50, ge=2)


@dataclass(frozen=True)
class WatchdogConfig:
    """The hang watchdog (apt/trainops/reliability/watchdog.py): a heartbeat thread per rank."""
    # A phase (forward, backward, optimizer, checkpoint, evaluation, ...) lasting longer than
    # this is a hang: every rank that can reports who stopped answering, dumps its stacks and
    # exits (code 4) so the launcher can restart the job. 0: no watchdog.
    timeout_s: float = rule(1800.0, ge=0)
    # The same for the start of train() (building the engine, compiling ops, loading a
    # checkpoint), which may legitimately take longer than a step.
    startup_timeout_s: float = rule(1800.0, gt=0)
    # How often each rank publishes its heartbeat (step, phase) and checks the others.
    heartbeat_s: float = rule(5.0, gt=0)


@dataclass(frozen=True)
class TargetConfig:
    """Train to a quality target (MLPerf's time-to-train rule): the run ends at the first
    evaluation whose ``metric`` reaches ``value``, and writes its checkpoint there as it would
    at ``max_steps`` (which stays the longest it may train, and the schedule's length)."""
    # A key of the evaluation's record in metrics.jsonl, e.g. val_loss, val_exact_match,
    # val_accuracy; None: no target. Checked at every evaluation (training.eval_interval).
    metric: Optional[str] = None
    value: float = 0.0
    # max: reached when metric >= value (accuracies); min: when metric <= value (losses).
    mode: Literal["max", "min"] = "max"

    def reached(self, result: dict) -> bool:
        score = result[self.metric]
        return score >= self.value if self.mode == "max" else score <= self.value
