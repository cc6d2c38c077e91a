"""The run's records: one ``StepRecord`` per step, summed over data-parallel ranks and turned
into the objective's metrics once per log interval (metrics.jsonl, the history, the step line);
the evaluations and whether one reached ``training.target``."""
from __future__ import annotations

import dataclasses
import time

import torch
import torch.distributed as dist

from apt.core.config import ConfigError
from .progress import format_duration


@dataclasses.dataclass
class StepRecord:
    step: int                     # the step done (1-based)
    result: object                # the engine's StepResult: statistics, loss units, grad norm
    lr: float
    seconds: float                # the step's wall time
    ended: float                  # time.time() at its end
    data_wait_s: float            # time spent waiting for batches
    sample_digest: torch.Tensor   # (sum of sample ids, sum of squares) this rank consumed
    extras: dict                  # a batch source's own values (e.g. time/generation_s)
    anomaly: str | None           # why the update was dropped, if it was

    @classmethod
    def of(cls, step: int, result, lr: float, began: float, batches,
           anomaly: str | None) -> "StepRecord":
        """The record of the step that began at ``began`` (perf_counter) and drew from
        ``batches`` (whose wait, digest and extras are taken here)."""
        return cls(step, result, lr, time.perf_counter() - began, time.time(),
                   batches.take_wait(), batches.take_sample_digest(), batches.take_extras(),
                   anomaly)


class RunLog:
    """Buffers the step records between log intervals. ``emit``: the callbacks' hook caller;
    ``history``: the trainer's list of records (appended to); ``artifacts``: the run's
    metrics.jsonl (written on the main rank)."""

    def __init__(self, objective, *, emit, history: list, artifacts, is_main: bool, progress,
                 max_steps: int, log_interval: int, tokens_per_step: int):
        self.objective, self.emit, self.history = objective, emit, history
        self.artifacts, self.is_main, self.progress = artifacts, is_main, progress
        self.max_steps, self.log_interval = max_steps, log_interval
        self.tokens_per_step = tokens_per_step
        self.pending: list[StepRecord] = []
        self._coverage_said = False

    def start(self, cfg, plan, run_dir, lines: list[str]) -> None:
        """The run's first lines: profile, run directory, plan, a trainer variant's lines."""
        self.progress.line(f"APT | profile {cfg.name} ({cfg.config_hash}) | run dir {run_dir}")
        self.progress.line("plan | " + plan.describe().replace("\n", "\n     | "))
        for line in lines:
            self.progress.line(line)

    def add(self, record: StepRecord) -> None:
        self.pending.append(record)

    def flush_if_due(self, step: int, force: bool = False) -> None:
        if self.pending and (step % self.log_interval == 0 or force):
            self.flush()

    def flush(self) -> None:
        """Sum the buffered per-step statistics over data-parallel ranks (one all-reduce per
        log interval, not per step), turn them into the objective's metrics, record them."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        from megatron.core import parallel_state
        group = parallel_state.get_data_parallel_group()
        sums = torch.stack([p.result.sums for p in pending])
        units = torch.stack([p.result.units for p in pending]).tolist()   # already global
        digests = torch.stack([p.sample_digest for p in pending]).to(sums.device)
        both = torch.cat([sums, digests], dim=1)
        dist.all_reduce(both, group=group)       # one all-reduce: statistics and sample digests
        names = self.objective.stat_names
        records = [{"step": p.step,
                    **self.objective.step_metrics(dict(zip(names, row[:len(names)])), n),
                    "lr": p.lr, "grad_norm": None if p.result.grad_norm is None
                    else float(p.result.grad_norm),
                    "step_time": p.seconds, "tokens_per_s": self.tokens_per_step / p.seconds,
                    "time": p.ended, "data_wait_s": p.data_wait_s,
                    "sample_digest": [int(v) for v in row[len(names):]],
                    **_time_split(p.seconds, p.data_wait_s, p.extras),
                    **({"anomaly": p.anomaly} if p.anomaly else {})}
                   for p, row, n in zip(pending, both.tolist(), units)]
        self.emit("on_log", records)
        for record in records:
            self.history.append(record)
            if self.is_main:
                self.artifacts.save_metrics(record)
        step, mean_time = pending[-1].step, sum(p.seconds for p in pending) / len(pending)
        speed = self.tokens_per_step / mean_time
        self.progress.update(step, record["loss"], speed)
        self.progress.line(f"step {step}/{self.max_steps} | loss {record['loss']:.4f} | lr "
                           f"{record['lr']:.2e} | grad norm {_fmt(record['grad_norm'])} | "
                           f"{speed:,.0f} tok/s | {mean_time * 1000:.0f} ms/step | eta "
                           f"{format_duration(self.progress.eta(step))}")


    def evaluation(self, result: dict, step: int, coverage) -> dict:
        """Record an evaluation's result (``coverage``: which held-out samples it scored)."""
        if not result:
            return result
        result = {"step": step, **result}
        self.emit("on_evaluate", result)
        if self.is_main:
            self.artifacts.save_metrics(result)
        self.progress.line(f"eval @ step {step} | " + eval_summary(result))
        if coverage is not None and coverage.left_out and not self._coverage_said:
            self.progress.line("eval | " + coverage.line())   # once: the same at every eval
            self._coverage_said = True
        return result

    def reached(self, target, result: dict | None, step: int) -> bool:
        """Whether this evaluation reached ``target`` (training.target; every rank holds the
        same reduced result, so every rank stops at the same step)."""
        if target.metric is None or not result:
            return False
        if target.metric not in result:
            known = ", ".join(k for k, v in result.items() if isinstance(v, float))
            raise ConfigError(f"{target.metric!r} is not among this run's evaluation results "
                              f"({known})", key="training.target.metric")
        if not target.reached(result):
            return False
        sign = ">=" if target.mode == "max" else "<="
        self.progress.line(f"target | {target.metric} {result[target.metric]:.4f} {sign} "
                           f"{target.value:g} at step {step}: training ends here")
        return True


def eval_summary(result: dict) -> str:
    """The evaluation line: the token metrics when the objective has them, then every other
    float metric (e.g. exact-match, preference accuracy)."""
    parts = [f"val loss {result['val_loss']:.4f} nats"] if "val_loss" in result else []
    if "val_bits_per_token" in result:
        parts[0] += f" ({result['val_bits_per_token']:.3f} bits/token)"
        parts += [f"perplexity {result['val_perplexity']:.2f}",
                  f"next-token accuracy {result['val_accuracy']:.3f}"]
    shown = {"step", "val_loss", "val_bits_per_token", "val_perplexity", "val_tokens"}
    if "val_bits_per_token" in result:
        shown.add("val_accuracy")   # next-token accuracy, shown above
    parts += [f"{k[4:]} {v:.3f}" for k, v in result.items()
              if k not in shown and isinstance(v, float)]
    return " | ".join(parts)


def _time_split(seconds: float, wait: float, extras: dict) -> dict:
    """A batch source's extras; where it reports time spent on phases of its own
    (``time/generation_s``), the rest of the step is ``time/training_s``."""
    phases = [v for k, v in extras.items() if k.startswith("time/")]
    if not phases:
        return extras
    return {**extras, "time/training_s": max(seconds - wait - sum(phases), 0.0)}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
