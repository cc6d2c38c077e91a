"""CheckpointManager: atomic, verified, retained checkpoints.

    <save_dir>/checkpoint-<step>/
        manifest.json        written last: version, step, lineage, files with size + SHA-256
        state.json           step, consumed samples, config + hash, layout, versions
        model/               model weights, Megatron dist_checkpointing (reshards on load)
        optimizer/           optimizer state in model space (optimizer_state.py)
        trainer/rank-N.pt    each rank's RNG states (tensors and numbers only)

A save writes into ``.tmp-checkpoint-<step>-<lineage>-<nonce>/``; once every rank has finished
and every file is fsynced, rank 0 writes the manifest and renames the directory. A crash at any point
leaves either the previous checkpoints untouched or a temporary directory that is never loaded
(and removed by the next save of the same lineage).

Lineage: a run gets an id when it starts (a resumed run keeps its checkpoint's), written into
every manifest. Retention and auto-resume consider only checkpoints of this lineage, judged by
what they hold (directory.py): another run's checkpoints, symlinks, or a directory whose number
is not the step it holds are never deleted, replaced or resumed from automatically (they are
reported when the run starts, and one at a step this run will save refuses the start). A
rewind moves the lineage's later checkpoints under superseded/. Loading verifies the whole
checkpoint first (verification.py).

With ``async_save`` the caller waits only while the shards are planned and copied to host
memory; a forked writer per rank writes and checksums them (background.py) and ``wait()``, a
collective the training loop calls once every rank's writer is done, commits the checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from apt.trainops.distributed.runtime import ranks_raising
from . import results_queue
from .background import (PARTS, ShardWriter, read_parts, stage_in_host_memory,
                         start_writer_warmup)
from .directory import (NAME, describe_foreign, last_lineage, record_commit, retain, scan,
                        supersede_newer)
from .manifest import MANIFEST_VERSION, fsync, read_manifest, verify, write_manifest
from .verification import CheckpointState, verify_checkpoint

from .errors import CheckpointError

log = logging.getLogger(__name__)
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
        if _rank() == 0:
            path.mkdir(parents=True, exist_ok=True)
        _barrier()
        strategy = _save_strategy(spread_replicas=not assembled)
        results_queue.install()   # not Megatron's spawned one: it re-runs unguarded scripts
        request = dist_checkpointing.save(sharded_state_dict, str(path),
                                          sharded_strategy=strategy, async_sharded_save=True)
        self.requests.append(stage_in_host_memory(request, private=assembled))
        return path


class CheckpointManager:
    def __init__(self, save_dir: str | os.PathLike = "checkpoints", save_interval: int = 500,
                 keep_last_n: int = 5, keep_every: int | None = None, async_save: bool = False,
                 lineage: str | None = None):
        self.save_dir = Path(save_dir)
        # The id written into every manifest of this run and of the runs resuming it. None
        # until a run begins (begin()), a checkpoint is loaded (its lineage continues) or the
        # first save (a new one).
        self.lineage = lineage
        self.save_interval, self.keep_last_n, self.keep_every = save_interval, keep_last_n, keep_every
        self.async_save = async_save
        self.last_step: int | None = None   # the run's training.max_steps (begin()'s check)
        self._pending: CheckpointWrite | None = None
        self._warmup = start_writer_warmup() if async_save and save_interval else None
        # Rank 0, after each commit: step, stall_s (the loop's wait), write_s (slowest rank's
        # background write), commit_s, bytes.
        self.last_save: dict | None = None

    # ------------------------------------------------------------------ saving
    def should_save(self, step: int) -> bool:
        return bool(self.save_interval) and step % self.save_interval == 0

    @contextlib.contextmanager
    def writing(self, step: int, meta: dict | None = None):
        """Collective: every rank enters. Yields a ``CheckpointWrite`` to add the parts to.

        On leaving the block the shard writes start: in a background process with
        ``async_save`` (``wait()`` commits them), otherwise here, committed before returning.
        A save always waits for the previous one first: one checkpoint in flight at a time."""
        self.wait()
        if self._warmup is not None:
            self._warmup.join()
        start = time.perf_counter()
        rank = _rank()
        names = [None]
        if rank == 0:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            self.lineage = self.lineage or new_lineage()
            # This lineage's leftovers (an earlier failed save, or a crash of this run before
            # it resumed); another run's save may be in flight there: left alone.
            for stale in self.save_dir.glob(f"{TMP_PREFIX}*-{self.lineage}-*"):
                shutil.rmtree(stale, ignore_errors=True)
            names[0] = str(self.save_dir / f"{TMP_PREFIX}{step}-{self.lineage}-"
                                           f"{uuid.uuid4().hex[:8]}")
            Path(names[0]).mkdir()
        _broadcast(names)
        write = CheckpointWrite(Path(names[0]), step, meta or {}, started=start)
        yield write
        # An exception above leaves the temporary directory unmanifested: it never loads, and
        # the next save of this lineage removes it.
        write.writer = ShardWriter(write.requests, write.directory, rank)
        write.writer.start(background=self.async_save)
        write.stall_s = time.perf_counter() - start
        self._pending = write
        if not self.async_save:
            self.wait()

    def writing_in_background(self) -> bool:
        """Whether this rank's writer for the pending checkpoint is still running (local)."""
        return self._pending is not None and self._pending.writer.running()

    def wait(self) -> Path | None:
        """Collective: commit the pending checkpoint once every rank's writer is done. Runs
        dist_checkpointing's finalization (its metadata), then rank 0 writes the manifest and
        renames the directory. Returns the checkpoint's path, None if nothing was pending.
        Raises CheckpointError on every rank if any rank failed to write its shards."""
        write, self._pending = self._pending, None
        if write is None:
            return None
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
        target = self.save_dir / f"checkpoint-{write.step}"
        _barrier()   # every rank's shards and metadata are written
        commit_start = time.perf_counter()
        occupied = self._not_ours(target) if _rank() == 0 else None
        if ranks_raising(occupied is not None)[0]:
            occupied = occupied or "not this run's (see rank 0)"
            raise CheckpointError(f"checkpoint-{write.step} was not saved: {target} is "
                                  f"{occupied}, which is never replaced; save this run into "
                                  f"another training.checkpoints.dir")
        if _rank() == 0:
            known, write_s = read_parts(write.directory)
            shutil.rmtree(write.directory / PARTS, ignore_errors=True)
            self.lineage = self.lineage or new_lineage()
            manifest = write_manifest(write.directory, {
                "step": write.step, "lineage": self.lineage, "committed_at": time.time(),
                **write.meta}, known)
            if target.exists():      # re-saving a step of this run: the new one replaces it
                shutil.rmtree(target)
            os.replace(write.directory, target)
            fsync(self.save_dir)   # the rename itself is durable
            record_commit(self.save_dir, self.lineage, write.step)
            retain(self.save_dir, self.lineage, write.step, self.keep_last_n, self.keep_every)
            # A synchronous save stalls the caller for all of it, commit included.
            stall = write.stall_s if self.async_save else time.perf_counter() - write.started
            self.last_save = {"step": write.step, "stall_s": stall, "write_s": write_s,
                              "commit_s": time.perf_counter() - commit_start,
                              "bytes": sum(f["bytes"] for f in manifest["files"].values())}
        _barrier()
        write.committed = target
        return target

    def abort(self) -> None:
        """Local, no collectives (for error paths): stop this rank's writer; the pending
        checkpoint is never committed."""
        write, self._pending = self._pending, None
        if write is not None:
            write.writer.kill()

    def save(self, model=None, optimizer=None, step: int = 0, **extra) -> Path:
        """The seed API: ``save(model=model, optimizer=optimizer, step=1000)``.

        ``model``: an APTModel (or a list of model chunks) or any torch module; ``optimizer``: a
        training engine (apt.trainops.distributed.engines) or a plain torch optimizer. With
        ``async_save`` the checkpoint appears at the returned path once ``wait()`` (or the next
        save) commits it. ``load(name, model=..., optimizer=...)`` reads it back."""
        from apt.trainops.distributed.runtime import ensure_runtime
        from .model_weights import _sharded_state
        from .optimizer_state import optimizer_sharded_state
        ensure_runtime()   # dist_checkpointing is collective: a one-process group in a script
        modules = model if isinstance(model, (list, tuple)) else [model] if model else []
        with self.writing(step, {"kind": "model+optimizer"}) as ckpt:
            if modules:
                ckpt.add_sharded("model", _sharded_state(modules))
            if optimizer is not None and hasattr(optimizer, "kind"):
                with optimizer_sharded_state(optimizer) as sharded:
                    ckpt.add_sharded("optimizer", sharded, assembled=True)
            elif optimizer is not None:
                (ckpt.directory / "optimizer").mkdir(exist_ok=True)
                torch.save(optimizer.state_dict(),
                           ckpt.directory / "optimizer" / f"rank-{_rank():05d}.pt")
            if _rank() == 0:
                (ckpt.directory / "state.json").write_text(json.dumps({"step": step, **extra}))
        return self.save_dir / f"checkpoint-{step}"

    # ------------------------------------------------------------------ finding and loading
    def list(self, checksums: bool = True) -> list[dict]:
        """Every checkpoint directory, newest first, with whether it would load and why not
        (``checksums``: the full verification loading runs, else manifest and sizes only)."""
        entries = []
        for found in self._scan():
            if found["refused"]:
                state, reason = None, found["refused"]
            elif found["symlink"]:
                state, reason = None, ("a symlink: auto-resume and retention skip it (resume "
                                       "it by the path it links to)")
            elif checksums:
                state, reason = verify_checkpoint(found["path"])
            else:
                state, reason = verify(found["path"], checksums=False)
            manifest = state.manifest if isinstance(state, CheckpointState) else state
            entries.append({**found, "path": str(found["path"]), "ok": reason is None,
                            "reason": reason, "bytes": sum(f["bytes"] for f in
                                                           manifest["files"].values())
                            if manifest else None})
        return entries

    def load(self, name_or_path: str | os.PathLike, model=None,
             optimizer=None) -> CheckpointState:
        """The verified checkpoint (its lineage continues in this manager's saves); given
        ``model`` and ``optimizer`` (as passed to ``save``), their state is loaded from it too
        (collective)."""
        state = self._verified(name_or_path)
        self.continue_lineage(state)
        if model is not None or optimizer is not None:
            from .model_weights import load_model_weights
            from .optimizer_state import load_optimizer_state
            if model is not None:
                load_model_weights(model if isinstance(model, (list, tuple)) else [model],
                                   state.path / "model", verified=True, manifest=state.manifest)
            if optimizer is not None and hasattr(optimizer, "kind"):
                load_optimizer_state(optimizer, state.path / "optimizer", verified=True,
                                     manifest=state.manifest)
            elif optimizer is not None:
                optimizer.load_state_dict(load_torch_optimizer_state(state.path,
                                                                     state.manifest))
        return state

    def _verified(self, name_or_path: str | os.PathLike) -> CheckpointState:
        given = path = Path(name_or_path)
        if not path.is_absolute() and not path.exists():
            path = self.save_dir / path
        if not path.is_dir():
            # Name the path as given (a relative path that exists nowhere is not "under
            # save_dir" either) and what the directory the user meant holds instead.
            where = given.parent if given.parent.is_dir() and given.parent != Path(".") \
                else self.save_dir
            names = [e["name"] for e in CheckpointManager(where).list(checksums=False)]
            raise CheckpointError(f"{given}: no such checkpoint; {where} holds "
                                  f"{', '.join(names) if names else 'no checkpoints'}")
        # Named explicitly, a link to a checkpoint is followed (only listing and auto-resume,
        # which choose for the user, skip links); what is inside may hold none.
        state, reason = verify_checkpoint(path.resolve())
        if reason:
            raise CheckpointError(f"{path}: {reason}")
        return state

    def load_latest(self) -> CheckpointState | None:
        """The newest checkpoint of this run's lineage that verifies (each one skipped is
        logged with its reason); only that one is hashed in full, once.

        Without a lineage yet (a run starting with auto-resume), the lineage is that of the
        directory's last commit (directory.last_lineage): the run that was interrupted.
        Checkpoints of other lineages, symlinks and refused directories are never chosen."""
        found = [f for f in self._scan() if not f["symlink"]]
        lineage = self.lineage or last_lineage(self.save_dir, found)
        for entry in found:
            if entry["refused"]:
                log.warning("refusing %s: %s", entry["path"], entry["refused"])
                continue
            if entry["readable"] and entry["lineage"] != lineage:
                continue
            state, reason = verify_checkpoint(entry["path"])
            if reason is None:
                self.continue_lineage(state)
                return state
            log.warning("skipping %s: %s", entry["path"], reason)
        self.lineage = self.lineage or lineage
        return None

    # ------------------------------------------------------------------ lineage
    def continue_lineage(self, state: CheckpointState) -> None:
        """This manager's saves continue the loaded checkpoint's run (one written before
        lineage ids starts a new one at the first save)."""
        self.lineage = state.lineage or self.lineage

    def begin(self, resumed: CheckpointState | None = None, rewind: bool = False) -> None:
        """A run starts (rank 0): its lineage is the resumed checkpoint's or a new one; the
        directory must be writable; checkpoints of other runs in it are reported (one line),
        and one at a step this run will save refuses the start. ``rewind``: the checkpoint was
        named explicitly, so the lineage's later ones here move to superseded/."""
        if resumed is not None:
            self.continue_lineage(resumed)
        self.lineage = self.lineage or new_lineage()
        self.check_writable()
        found = self._scan()
        start = resumed.step if resumed is not None else 0
        others = [f for f in found if f["symlink"] or not f["readable"]
                  or f["lineage"] != self.lineage]
        if others:
            log.warning("%s holds %d checkpoint(s) not of this run (lineage %s): %s; they are "
                        "never resumed automatically nor deleted by retention", self.save_dir,
                        len(others), self.lineage,
                        ", ".join(f["name"] + describe_foreign(f) for f in others[:8])
                        + (" ..." if len(others) > 8 else ""))
        blocking = [f for f in others if self._will_save(f["step"], start)]
        if blocking:
            raise CheckpointError(
                f"{blocking[-1]['path']}: this run would save step {blocking[-1]['step']} there, "
                f"but it is not this run's checkpoint{describe_foreign(blocking[-1])}; move it "
                f"away or set training.checkpoints.dir to another directory")
        if rewind and resumed is not None and Path(resumed.path).parent.resolve() == \
                self.save_dir.resolve():
            supersede_newer(self.save_dir, found, self.lineage, resumed.step)

    def _will_save(self, step: int, start: int) -> bool:
        """Whether this run's saves reach ``step`` (every save_interval-th step up to
        last_step, and last_step itself; unknown last_step: none is assumed)."""
        if not self.save_interval or self.last_step is None or not start < step <= \
                self.last_step:
            return False
        return step % self.save_interval == 0 or step == self.last_step

    def check_writable(self) -> None:
        """Raise CheckpointError now, rather than at the first save after the steps trained,
        if checkpoints cannot be written under save_dir."""
        existing = self.save_dir
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            if not existing.is_dir():
                raise NotADirectoryError(f"{existing} is not a directory")
            probe = existing / f".apt-write-probe-{uuid.uuid4().hex[:8]}"
            probe.mkdir()
            probe.rmdir()
        except OSError as exc:
            raise CheckpointError(f"{self.save_dir}: checkpoints cannot be written there "
                                  f"({exc.strerror or exc}); set training.checkpoints.dir to a "
                                  f"writable directory") from None

    def _scan(self) -> list[dict]:
        return scan(self.save_dir)

    def _not_ours(self, target: Path) -> str | None:
        """Why ``target`` must not be replaced by this run's save, None if it may."""
        if target.is_symlink():
            return "a symlink"
        if not target.exists():
            return None
        manifest, _ = read_manifest(target)
        if manifest is None or manifest.get("lineage") is None or \
                manifest.get("lineage") != self.lineage:
            return "another run's checkpoint"
        if manifest.get("step") != int(NAME.match(target.name).group(1)):
            return f"a directory holding step {manifest.get('step')}"
        return None


def new_lineage() -> str:
    return uuid.uuid4().hex[:16]


def load_torch_optimizer_state(path: Path, manifest: dict | None = None) -> dict:
    """This rank's state of a plain torch optimizer, as ``save()`` wrote it (tensors and
    numbers only), read once and compared with ``manifest``'s entry (the verified one)."""
    from .checked_reader import load_checked_torch_file
    file = path / "optimizer" / f"rank-{_rank():05d}.pt"
    if not file.is_file():
        raise CheckpointError(f"{path}: holds no plain torch optimizer state for this rank "
                              f"(no {file.relative_to(path)})")
    entry = (manifest or read_manifest(path)[0] or {"files": {}})["files"].get(
        file.relative_to(path).as_posix())
    if entry is None:
        raise CheckpointError(f"{file}: not listed in the checkpoint's manifest")
    return load_checked_torch_file(file, entry)


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


def _drain_write_results() -> None:
    from queue import Empty
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    queue = filesystem_async._results_queue
    while queue is not None:
        try:
            queue.get_nowait()
        except Empty:
            return


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast(objects: list) -> None:
    if dist.is_initialized():
        dist.broadcast_object_list(objects, src=0)


__all__ = ["CheckpointError", "CheckpointManager", "CheckpointState", "MANIFEST_VERSION"]
