"""Whose checkpoints a directory holds when a run starts (CheckpointManager.begin).

A run gets a lineage id when it starts (a resumed run keeps its checkpoint's), written into
every manifest. Checkpoints of other lineages, symlinks and unreadable ones are reported in
one line and left alone; one at a step this run will save refuses the start, since the save
could neither replace it nor be made beside it. A rewind (a checkpoint named explicitly) moves
the lineage's later checkpoints under superseded/ (directory.supersede_newer).
"""
from __future__ import annotations

import logging
import uuid

from .directory import describe_foreign
from .errors import CheckpointError

log = logging.getLogger("apt.trainops.checkpoints.manager")


def new_lineage() -> str:
    return uuid.uuid4().hex[:16]


def refuse_foreign(save_dir, found: list[dict], lineage: str, will_save) -> None:
    """Report ``found``'s checkpoints not of ``lineage`` (one line); raise CheckpointError
    for one at a step ``will_save(step)`` says this run saves."""
    others = [f for f in found if f["symlink"] or not f["readable"] or f["lineage"] != lineage]
    if others:
        log.warning("%s holds %d checkpoint(s) not of this run (lineage %s): %s; they are "
                    "never resumed automatically nor deleted by retention", save_dir,
                    len(others), lineage,
                    ", ".join(f["name"] + describe_foreign(f) for f in others[:8])
                    + (" ..." if len(others) > 8 else ""))
    blocking = [f for f in others if will_save(f["step"])]
    if blocking:
        raise CheckpointError(
            f"{blocking[-1]['path']}: this run would save step {blocking[-1]['step']} there, "
            f"but it is not this run's checkpoint{describe_foreign(blocking[-1])}; move it "
            f"away or set training.checkpoints.dir to another directory")


def will_save(step: int, start: int, save_interval: int, last_step: int | None) -> bool:
    """Whether a run from ``start`` saves ``step`` (every save_interval-th step up to
    last_step, and last_step itself; unknown last_step: none is assumed)."""
    if not save_interval or last_step is None or not start < step <= last_step:
        return False
    return step % save_interval == 0 or step == last_step
