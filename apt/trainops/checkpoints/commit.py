"""Committing a written checkpoint (CheckpointManager's second job).

Once every rank's writer is done, dist_checkpointing's finalization writes its metadata; rank
0 then writes the manifest (version, step, lineage, files with size + SHA-256), renames the
temporary directory to ``checkpoint-<step>``, makes the rename durable, records the commit and
applies retention (directory.py). A failure on any rank fails the commit on every rank, and
the directory stays unmanifested (it never loads).
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from torch.distributed.checkpoint.api import CheckpointException

from apt.trainops.runtime.process_groups import ranks_raising
from .background import PARTS, read_parts
from .directory import NAME, record_commit, retain
from .errors import CheckpointError
from .manifest import fsync, read_manifest, write_manifest
from .ranks import barrier, rank
from .writing import CheckpointWrite


def commit_write(write: CheckpointWrite, save_dir: Path, lineage: str | None, *,
                 keep_last_n: int, keep_every: int | None, synchronous: bool) -> dict | None:
    """Collective: commit ``write`` as ``<save_dir>/checkpoint-<step>`` (``write.committed``).
    Returns, on rank 0, what the save cost: step, stall_s (the caller's wait; all of it for a
    ``synchronous`` save), write_s (slowest rank's write), commit_s, bytes. Raises
    CheckpointError on every rank if any rank failed to write its shards."""
    error = write.writer.join()
    failures, = ranks_raising(error is not None)
    try:
        if failures:
            raise CheckpointError(f"{failures} rank(s) could not write their shards"
                                  + (f"; here: {error}" if error else ""))
        for request in write.requests:
            for finalize in request.finalize_fns:
                finalize()
    except (Exception, CheckpointException) as exc:   # torch's is a BaseException
        _drain_write_results()   # results a failed write left behind must not reach the next
        raise CheckpointError(f"checkpoint-{write.step} was not saved ({write.directory} "
                              f"stays unmanifested and never loads): {exc}") from exc
    target = save_dir / f"checkpoint-{write.step}"
    barrier()   # every rank's shards and metadata are written
    commit_start = time.perf_counter()
    occupied = not_replaceable(target, lineage) if rank() == 0 else None
    if ranks_raising(occupied is not None)[0]:
        occupied = occupied or "not this run's (see rank 0)"
        raise CheckpointError(f"checkpoint-{write.step} was not saved: {target} is "
                              f"{occupied}, which is never replaced; save this run into "
                              f"another training.checkpoints.dir")
    cost = None
    if rank() == 0:
        known, write_s = read_parts(write.directory)
        shutil.rmtree(write.directory / PARTS, ignore_errors=True)
        manifest = write_manifest(write.directory, {
            "step": write.step, "lineage": lineage, "committed_at": time.time(),
            **write.meta}, known)
        if target.exists():      # re-saving a step of this run: the new one replaces it
            shutil.rmtree(target)
        os.replace(write.directory, target)
        fsync(save_dir)   # the rename itself is durable
        record_commit(save_dir, lineage, write.step)
        retain(save_dir, lineage, write.step, keep_last_n, keep_every)
        # A synchronous save stalls the caller for all of it, commit included.
        stall = time.perf_counter() - write.started if synchronous else write.stall_s
        cost = {"step": write.step, "stall_s": stall, "write_s": write_s,
                "commit_s": time.perf_counter() - commit_start,
                "bytes": sum(f["bytes"] for f in manifest["files"].values())}
    barrier()
    write.committed = target
    return cost


def not_replaceable(target: Path, lineage: str | None) -> str | None:
    """Why ``target`` must not be replaced by a save of ``lineage``, None if it may."""
    if target.is_symlink():
        return "a symlink"
    if not target.exists():
        return None
    manifest, _ = read_manifest(target)
    if manifest is None or manifest.get("lineage") is None or \
            manifest.get("lineage") != lineage:
        return "another run's checkpoint"
    if manifest.get("step") != int(NAME.match(target.name).group(1)):
        return f"a directory holding step {manifest.get('step')}"
    return None


def _drain_write_results() -> None:
    from queue import Empty
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    queue = filesystem_async._results_queue
    while queue is not None:
        try:
            queue.get_nowait()
        except Empty:
            return
