"""Writing a checkpoint (CheckpointManager's first job): its temporary directory, the parts
added to it, and the start of the shard writes.

A save writes into ``.tmp-checkpoint-<step>-<lineage>-<nonce>/``; nothing there is ever
loaded until ``commit.py`` has written its manifest and renamed it. A crash leaves the
directory unmanifested, and the next save of the same lineage removes it.
"""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from . import results_queue
from .background import ShardWriter, stage_in_host_memory
from .errors import CheckpointError
from .ranks import barrier, broadcast, rank

TMP_PREFIX = ".tmp-checkpoint-"


class CheckpointWrite:
    """A checkpoint being saved: its temporary directory and the parts added to it so far."""

    def __init__(self, directory: Path, step: int, meta: dict, started: float):
        self.directory, self.step, self.meta = directory, step, meta
        self.requests: list = []      # Megatron AsyncRequests, tensors staged in host memory
        self.writer: ShardWriter | None = None
        self.started = started   # perf_counter() when the save began
        self.stall_s = 0.0   # how long the caller waited (set when the writes start)
        self.committed: Path | None = None   # set by CheckpointManager.wait()

    def add_sharded(self, name: str, sharded_state_dict: dict, assembled: bool = False) -> Path:
        """Collective: a dist_checkpointing part in ``<checkpoint>/<name>/``. Planned and copied
        to host memory now; written when the ``writing()`` block ends.

        ``assembled``: the state dict was assembled for this save and already names, by its
        replica ids, one writer per shard (optimizer_state.py). Its host tensors need no copy
        (nothing else changes them), and the writes are not redistributed. Otherwise (model
        weights) the writes of data-parallel replicas are spread over the data-parallel ranks."""
        from megatron.core import dist_checkpointing
        path = self.directory / name
        if rank() == 0:
            path.mkdir(parents=True, exist_ok=True)
        barrier()
        strategy = _save_strategy(spread_replicas=not assembled)
        results_queue.install()   # not Megatron's spawned one: it re-runs unguarded scripts
        request = dist_checkpointing.save(sharded_state_dict, str(path),
                                          sharded_strategy=strategy, async_sharded_save=True)
        self.requests.append(stage_in_host_memory(request, private=assembled))
        return path


def open_write(save_dir: Path, lineage: str | None, step: int, meta: dict,
               started: float) -> CheckpointWrite:
    """Collective: rank 0 (whose ``lineage`` is set) creates the temporary directory, after
    removing this lineage's leftovers; every rank gets the same ``CheckpointWrite``."""
    names = [None]
    if rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        # This lineage's leftovers (an earlier failed save, or a crash of this run before
        # it resumed); another run's save may be in flight there: left alone.
        for stale in save_dir.glob(f"{TMP_PREFIX}*-{lineage}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        names[0] = str(save_dir / f"{TMP_PREFIX}{step}-{lineage}-{uuid.uuid4().hex[:8]}")
        Path(names[0]).mkdir()
    broadcast(names)
    return CheckpointWrite(Path(names[0]), step, meta, started=started)


def start_writes(write: CheckpointWrite, background: bool) -> None:
    """This rank's shard writes begin: in a forked writer (``background``) or here."""
    write.writer = ShardWriter(write.requests, write.directory, rank())
    write.writer.start(background=background)


def check_writable(save_dir: Path) -> None:
    """Raise CheckpointError now, rather than at the first save after the steps trained,
    if checkpoints cannot be written under ``save_dir``."""
    existing = save_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a directory")
        probe = existing / f".apt-write-probe-{uuid.uuid4().hex[:8]}"
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise CheckpointError(f"{save_dir}: checkpoints cannot be written there "
                              f"({exc.strerror or exc}); set training.checkpoints.dir to a "
                              f"writable directory") from None


def _save_strategy(spread_replicas: bool):
    """Megatron's torch_dist writer; with ``spread_replicas`` the writing of shards replicated
    over data-parallel ranks is spread over them instead of all falling on the first one."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper)
    strategy = get_default_save_sharded_strategy()
    if not spread_replicas or not parallel_state.model_parallel_is_initialized() or \
            parallel_state.get_data_parallel_world_size(with_context_parallel=True) == 1:
        return strategy
    return FullyParallelSaveStrategyWrapper(
        strategy, parallel_state.get_data_parallel_group(with_context_parallel=True))
