"""Fault injection, for tests only: ``APT_FAULT_INJECT`` makes one rank fail on purpose.

    APT_FAULT_INJECT="nan:rank=1:batch=3"                       # that rank's loss is NaN on
                                                                # the 3rd global batch drawn
    APT_FAULT_INJECT="spike:rank=1:batch=3:factor=50"           # ... multiplied by 50
    APT_FAULT_INJECT="stall:rank=1:step=3:phase=forward:seconds=600"   # sleeps in that phase
    APT_FAULT_INJECT="kill:rank=1:step=5:phase=backward:restart=0"     # SIGKILLs itself (on
                                                                # the launcher's first attempt)

Read here and nowhere else; unset, nothing changes. ``step`` is the 1-based optimizer step being
trained, ``batch`` the 1-based global batch drawn from the data (they differ after a rewind),
``restart`` the launcher's restart count (TORCHELASTIC_RESTART_COUNT / SLURM_RESTART_COUNT).
"""
from __future__ import annotations

import os
import signal
import time

ENV = "APT_FAULT_INJECT"


def _spec() -> dict | None:
    """The fault asked for (read on every call, so a test can change it between runs)."""
    text = os.environ.get(ENV)
    if not text:
        return None
    kind, *fields = text.split(":")
    return {"kind": kind, **dict(item.partition("=")[::2] for item in fields)}


def _mine(spec: dict | None, kind: str) -> bool:
    if spec is None or spec["kind"] != kind:
        return False
    import torch.distributed as dist
    rank = dist.get_rank() if dist.is_initialized() else 0
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT",
                                 os.environ.get("SLURM_RESTART_COUNT", 0)))
    return int(spec.get("rank", 0)) == rank and int(spec.get("restart", restart)) == restart


def loss_factor(batch: int) -> float | None:
    """What this rank's loss on global batch ``batch`` is to be multiplied by (NaN, a spike's
    factor), or None."""
    spec = _spec()
    if spec is None or int(spec.get("batch", -1)) != batch:
        return None
    if _mine(spec, "nan"):
        return float("nan")
    if _mine(spec, "spike"):
        return float(spec.get("factor", 50))
    return None


def at_phase(step: int, phase: str) -> None:
    """Called on entering every phase (watchdog.set_phase): stall or die here if told to."""
    spec = _spec()
    if spec is None or spec.get("phase", "forward") != phase or int(spec.get("step", -1)) != step:
        return
    if _mine(spec, "stall"):
        time.sleep(float(spec.get("seconds", 3600)))
    elif _mine(spec, "kill"):
        os.kill(os.getpid(), signal.SIGKILL)
