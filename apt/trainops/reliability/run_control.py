"""Run control: after every step, one decision that every rank takes alike.

Each rank votes in the step's one all-reduce (``vote``, which the engines call as
``before_update``, between the backward passes and the update): whether it was asked to stop
(SIGTERM / SIGUSR1, what SLURM and Kubernetes send before a kill), whether its checkpoint
writer is still busy, whether its loss statistics are finite, and the statistics themselves.
Summed, they give every rank the same global loss and the same flags, so ``decide`` returns
the same ``Decision`` everywhere:

- CONTINUE: train the next step (an anomalous step under the skip policy too);
- REWIND: the anomaly policy reloaded the last committed checkpoint; the loop goes on from it;
- STOP: preempted: the loop writes and commits a checkpoint at this step and leaves
  (EXIT_PREEMPTED: requeue as is);
- EXIT: the anomaly policy ends the run (``AnomalyStop``, EXIT_ANOMALY); ``reason`` says why.

Around those it owns the checkpoint save / commit / abort (a background write is committed
once every rank's writer is done, and abandoned when the run fails) and the watchdog: the
phases it marks and its heartbeat thread.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import signal
from typing import Callable

import torch
import torch.distributed as dist

from apt.trainops.runtime.process_groups import collective_device
from .anomaly import AnomalyGuard
from .watchdog import Watchdog, set_phase

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Decision(enum.Enum):
    CONTINUE = "continue"
    REWIND = "rewind"
    STOP = "stop"
    EXIT = "exit"


@dataclasses.dataclass(frozen=True)
class Votes:
    """What the step's all-reduce told every rank."""
    preempted: bool       # some rank was asked to stop
    writing: bool         # some rank's checkpoint writer is still busy
    loss: float           # the global loss (NaN when some rank's statistics are not finite)
    anomaly: str | None   # the anomaly guard's verdict on it


class PreemptionGuard:
    """SIGTERM / SIGUSR1 ask for a checkpoint at the next step boundary; ranks agree on it
    through the step's all-reduce (``RunControl.vote``)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        try:
            for sig in PREEMPTION_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:   # not the main thread: the launcher's handlers stay
            self._previous = {}
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class RunControl:
    """``save()``: write a checkpoint of the current state (returns the CheckpointWrite);
    ``restore(ckpt)``: load a committed checkpoint into the running model, engine and train
    state, forgetting the records of later steps (the rewind); returns the TrainState."""

    def __init__(self, config, plan, objective, checkpoints, anomalies: AnomalyGuard, *,
                 world_size: int, rank: int, is_main: bool, save: Callable,
                 restore: Callable):
        self.config, self.plan, self.objective = config, plan, objective
        self.checkpoints, self.anomalies = checkpoints, anomalies
        self.world_size, self.rank, self.is_main = world_size, rank, is_main
        self._save, self._restore = save, restore
        self.preemption = PreemptionGuard()
        self.votes: Votes | None = None
        self.reason: str | None = None     # why the run exits (Decision.EXIT)
        self.artifacts = self.progress = None

    # ------------------------------------------------------------------ around the run
    @contextlib.contextmanager
    def watching(self):
        """The hang watchdog's heartbeat thread, for the whole of ``Trainer.train``."""
        w = self.config.training.watchdog
        watchdog = Watchdog(w.timeout_s, w.heartbeat_s, self.rank, self.world_size,
                            w.startup_timeout_s).start()
        try:
            yield
        finally:
            watchdog.stop()

    @contextlib.contextmanager
    def running(self, artifacts, progress):
        """The steps: preemption signals are caught; a failing run abandons (never waits for,
        nor commits) a checkpoint still being written, since ranks may no longer agree and
        committing needs every rank. On leaving normally, the last save is committed."""
        self.artifacts, self.progress = artifacts, progress
        with self.preemption:
            try:
                yield self
                set_phase("checkpoint")
                self.commit()   # the last save, before the run reports done
            except BaseException:
                self.checkpoints.abort()
                raise

    # ------------------------------------------------------------------ one step
    def begin_step(self, step: int, batch: int) -> None:
        """Step ``step`` (1-based) starts on global batch ``batch`` (they differ after a
        rewind)."""
        set_phase("data", step=step, batch=batch)
        self.votes = None

    def vote(self, sums, units, grad_norm) -> bool:
        """Collective, the engines' ``before_update``: the step's one all-reduce. It carries
        the preemption flag, the writer's "still busy" flag, a "non-finite here" flag and the
        loss statistics (divided by the model-parallel replicas that hold the same ones).
        Returns whether to apply the update."""
        device = collective_device()
        replicas = self.world_size // self.plan.dp
        sums = sums.detach().to(device=device, dtype=torch.float64)
        flags = [float(self.preemption.requested),
                 float(self.checkpoints.writing_in_background()),
                 float(not bool(torch.isfinite(sums).all()))]
        vector = torch.cat([torch.tensor(flags, dtype=torch.float64, device=device),
                            sums / replicas])
        dist.all_reduce(vector)
        values = vector.tolist()
        preempted, writing, non_finite = (v > 0 for v in values[:3])
        loss = self.objective.step_metrics(dict(zip(self.objective.stat_names, values[3:])),
                                           float(units))["loss"]
        anomaly = self.anomalies.classify(float("nan") if non_finite else loss,
                                          None if grad_norm is None else float(grad_norm))
        self.votes = Votes(preempted, writing, loss, anomaly)
        return anomaly is None

    def settle(self, result) -> str | None:
        """After the engine's step: the votes (cast now for an engine that did not call
        ``before_update``); returns the step's anomaly, if any, the same on every rank."""
        set_phase("sync")
        if self.votes is None:
            self.vote(result.sums, result.units, result.grad_norm)
        votes = self.votes
        if votes.anomaly is None and result.grad_norm is not None:
            # DeepSpeed's ZeRO found non-finite gradients and skipped the update itself
            anomaly = self.anomalies.grad_norm_anomaly(float(result.grad_norm))
            self.votes = votes = dataclasses.replace(votes, anomaly=anomaly)
        self.anomalies.record(votes.loss, votes.anomaly)
        return votes.anomaly

    def decide(self, state, flush: Callable[[], None]) -> Decision:
        """The step's decision (``state``: the TrainState after the step). ``flush``: record
        the steps logged so far, called before an anomaly is handled so that the anomalous
        step's record precedes what the policy does about it."""
        votes = self.votes
        if votes.anomaly is not None:
            flush()
            decision = self._handle_anomaly(votes.anomaly, state)
            if decision is not Decision.CONTINUE:
                return decision
        if not votes.writing:
            self.commit()   # every rank's writer is done: commit
        return Decision.STOP if votes.preempted else Decision.CONTINUE

    # ------------------------------------------------------------------ checkpoints
    def save_if_due(self, step: int, end: bool) -> None:
        """A checkpoint when preempted, at the save interval, or at the run's end (``end``:
        the last step, or the step that reached training.target, so that resuming from it
        does not train on)."""
        if not (self.votes.preempted or self.checkpoints.should_save(step) or (
                end and self.config.training.checkpoints.save_interval)):
            return
        set_phase("checkpoint")
        write = self._save()
        if write.committed:
            self._report(write.committed)
        else:
            self.progress.line(f"checkpoint | step {step} staged in {write.stall_s:.2f} s, "
                               f"writing in the background")

    def commit(self) -> None:
        """Collective: commit the checkpoint written in the background, if one is pending."""
        path = self.checkpoints.wait()
        if path is not None:
            self._report(path)

    def stop(self, step: int) -> dict:
        """Preempted: the checkpoint of this step committed, the run leaves."""
        self.commit()
        self.progress.line(f"preempted | checkpoint at step {step} written; exiting (rerun "
                           f"with auto-resume to continue)")
        self.progress.close()
        return {"steps": step, "preempted": True}

    def _report(self, path) -> None:
        info = self.checkpoints.last_save
        if self.is_main and info:
            self.artifacts.save_metrics({"checkpoint_step": info["step"],
                                         **{f"checkpoint_{k}": v for k, v in info.items()
                                            if k != "step"}})
            self.progress.line(
                f"checkpoint | step {info['step']} -> {path} | {info['bytes'] / 2**20:.1f} MiB "
                f"| loop stalled {info['stall_s']:.2f} s, written in {info['write_s']:.2f} s, "
                f"committed in {info['commit_s']:.2f} s")

    # ------------------------------------------------------------------ anomalies
    def _handle_anomaly(self, anomaly: str, state) -> Decision:
        """Apply ``training.anomaly.policy`` to a step whose update was dropped (every rank
        alike)."""
        guard, cfg, step = self.anomalies, self.config.training.anomaly, state.step
        record = {"anomaly_step": step, "anomaly": anomaly, "anomalies": guard.count,
                  "policy": cfg.policy}
        self.progress.line(f"anomaly | step {step}: {anomaly}; its update was dropped "
                           f"(anomaly {guard.count} of at most {cfg.max_anomalies}, policy "
                           f"{cfg.policy})")
        if guard.must_stop():
            self.commit()   # a good checkpoint being written is kept
            if self.is_main:
                self.artifacts.save_metrics({**record, "action": "stop"})
            why = ("training.anomaly.policy is stop" if cfg.policy == "stop" else
                   f"training.anomaly.max_anomalies={cfg.max_anomalies} reached")
            self.reason = (f"step {step}: {anomaly}; stopping ({why}); no update was applied "
                           f"from it and no checkpoint holds it")
            return Decision.EXIT
        if cfg.policy == "rewind" and self._rewind(record, state):
            return Decision.REWIND
        if self.is_main:
            self.artifacts.save_metrics({**record, "action": "skip"})
        return Decision.CONTINUE

    def _rewind(self, record: dict, state) -> bool:
        """Reload the last committed checkpoint (weights, optimizer, RNGs, step) and keep the
        data cursor: the global batches since that checkpoint, the anomalous one included, are
        skipped. False (the step is just skipped) when no checkpoint was committed yet."""
        self.commit()   # a write in flight becomes the last committed
        answer = [None]
        if self.is_main:
            answer = [self.checkpoints.load_latest()]   # verified, this run's lineage
        dist.broadcast_object_list(answer, src=0)
        ckpt = answer[0]
        if ckpt is None:
            self.progress.line("anomaly | no committed checkpoint to rewind to: the step is "
                               "skipped")
            return False
        cursor, anomalous_step = state.consumed_samples, state.step
        restored = self._restore(ckpt)        # weights, optimizer, RNGs, step, history
        skipped = [ckpt.state.get("consumed_samples", ckpt.step * self.plan.global_batch),
                   cursor]
        restored.consumed_samples = cursor    # the data continues after the anomalous batch
        if self.is_main:
            self.artifacts.supersede_metrics(ckpt.step)
            self.artifacts.save_metrics({**record, "action": "rewind", "rewound_to": ckpt.step,
                                         "skipped_samples": skipped})
        self.progress.line(f"anomaly | rewound from step {anomalous_step} to {ckpt.path} (step "
                           f"{ckpt.step}); samples {skipped[0]}-{skipped[1] - 1} of the data "
                           f"order are skipped")
        return True
