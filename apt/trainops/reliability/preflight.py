"""Checks a run must pass before its model is built: enough memory for the plan's estimate, and
a checkpoint directory that is writable and has room for a checkpoint.

The trainer calls ``refuse_unless_ready`` before any process group or model exists, so a run
that cannot work ends with one line (exit code 2) instead of an allocation traceback, the OOM
killer, or a failed first save after hours of training. ``trainops doctor`` shows the same
checks in its table (apt/trainops/reliability/doctor.py).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from apt.core.config import ConfigError
from apt.trainops.distributed.memory import GIB

OK, WARN, FAIL = "ok", "warn", "FAIL"


class PreflightError(ConfigError):
    """This machine cannot run the plan as configured."""


@dataclass(frozen=True)
class Check:
    name: str
    status: str      # OK | WARN | FAIL
    detail: str
    source: str | None = None   # the file, path or profile the failure is about


def gib(n: float) -> str:
    """A size for a person: GiB, or MiB below a tenth of one."""
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def memory_check(cfg, plan, processes_per_node: int) -> Check:
    """The plan's estimate against the memory found: per GPU on CUDA (plus host memory for
    offloaded optimizer state and a preference reference), the node's available host memory
    for all its processes on CPU."""
    import psutil
    import torch
    mem, procs = plan.memory, processes_per_node
    host_have = psutil.virtual_memory().available
    host_per_proc = mem.host_optimizer + mem.host_reference
    needs = []   # (what, need, have)
    if plan.device_type == "cuda" and torch.cuda.is_available():
        gpu_have = min(torch.cuda.get_device_properties(i).total_memory
                       for i in range(torch.cuda.device_count()))
        needs.append(("GPU memory per GPU", mem.total, gpu_have, ""))
    else:
        host_per_proc += mem.total
    if host_per_proc:
        needs.append(("host memory", host_per_proc * procs, host_have,
                      f" ({procs} process(es) x {gib(host_per_proc)})" if procs > 1 else ""))
    short = [(what, need, have, how) for what, need, have, how in needs if need > have]
    summary = "; ".join(f"{what}: needs {gib(need)}{how}, has {gib(have)}"
                        for what, need, have, how in needs)
    if not short:
        return Check("memory", OK, summary)
    what, need, have, how = short[0]
    detail = (f"the plan needs {gib(need)} of {what}{how} and this machine has {gib(have)} "
              f"available; use more devices or a smaller model (`python -m apt plan`)")
    if not cfg.hardware.memory_check:
        return Check("memory", WARN, detail + "; starting anyway (hardware.memory_check=false)")
    return Check("memory", FAIL, detail + ", or set hardware.memory_check=false to start anyway",
                 source=f"profile {cfg.name}")


def checkpoint_dir_check(cfg, plan, where: Path) -> Check:
    """The checkpoint directory (or its nearest existing parent) is writable now and has room
    for one checkpoint of the plan's size (retention deletes old ones only after a new one is
    committed)."""
    from apt.trainops.checkpoints import CheckpointManager
    from apt.trainops.checkpoints.errors import CheckpointError
    if not cfg.training.checkpoints.save_interval:
        return Check("checkpoint dir", OK, f"{where}: no checkpoints are saved "
                     f"(training.checkpoints.save_interval=0)")
    try:
        CheckpointManager(where, save_interval=0).check_writable()
    except CheckpointError as exc:
        return Check("checkpoint dir", FAIL, str(exc).split(": ", 1)[-1], source=str(where))
    existing = where
    while not existing.exists():
        existing = existing.parent
    free, size = shutil.disk_usage(existing).free, plan.checkpoint_bytes
    keep = cfg.training.checkpoints.keep_last_n
    if free < size:
        return Check("checkpoint dir", FAIL, f"{gib(free)} free on its disk, one checkpoint "
                     f"needs {gib(size)}; free space or set training.checkpoints.dir",
                     source=str(where))
    detail = f"{where}: writable, {gib(free)} free, one checkpoint {gib(size)}"
    if free < size * (keep + 1):
        return Check("checkpoint dir", WARN, detail + f"; keep_last_n={keep} needs "
                     f"{gib(size * (keep + 1))} at the peak")
    return Check("checkpoint dir", OK, detail)


def refuse_unless_ready(cfg, plan, processes_per_node: int, checkpoints: Path) -> None:
    """Raise PreflightError (one line: what, where, both numbers) when the run would fail."""
    for check in (memory_check(cfg, plan, processes_per_node),
                  checkpoint_dir_check(cfg, plan, checkpoints)):
        if check.status == FAIL:
            raise PreflightError(check.detail, source=check.source)
