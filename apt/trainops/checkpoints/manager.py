"""CheckpointManager: atomic, verified, retained checkpoints.

    <save_dir>/checkpoint-<step>/
        manifest.json        written last: version, step, files with size + SHA-256
        state.json           step, consumed samples, config + hash, layout, versions
        model/               model weights, Megatron dist_checkpointing (reshards on load)
        optimizer/           optimizer state in model space (optimizer_state.py)
        trainer/rank-N.pt    each rank's RNG states (tensors and numbers only)

A save writes into ``.tmp-checkpoint-<step>-<nonce>/``; once every rank has finished and every
file is fsynced, rank 0 writes the manifest and renames the directory. A crash at any point
leaves either the previous checkpoints untouched or a temporary directory that is never loaded
(and removed by the next save).

With ``async_save`` the caller waits only while the shards are planned and copied to host
memory; a forked writer per rank writes and checksums them (background.py) and ``wait()``, a
collective the training loop calls once every rank's writer is done, commits the checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from apt.trainops.distributed.runtime import ranks_raising
from . import results_queue
from .background import (PARTS, ShardWriter, read_parts, stage_in_host_memory,
                         start_writer_warmup)
from .manifest import MANIFEST_VERSION, fsync, verify, write_manifest

log = logging.getLogger(__name__)
NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    pass


@dataclass
class CheckpointState:
    """A verified checkpoint: what ``Trainer(resume_from_checkpoint=...)`` takes."""
    path: Path
    step: int
    state: dict      # state.json
    manifest: dict


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
                 keep_last_n: int = 5, keep_every: int | None = None, async_save: bool = False):
        self.save_dir = Path(save_dir)
        self.save_interval, self.keep_last_n, self.keep_every = save_interval, keep_last_n, keep_every
        self.async_save = async_save
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
            for stale in self.save_dir.glob(".tmp-checkpoint-*"):
                shutil.rmtree(stale, ignore_errors=True)   # an earlier crash's leftovers
            names[0] = str(self.save_dir / f".tmp-checkpoint-{step}-{uuid.uuid4().hex[:8]}")
            Path(names[0]).mkdir()
        _broadcast(names)
        write = CheckpointWrite(Path(names[0]), step, meta or {}, started=start)
        yield write
        # An exception above leaves the temporary directory unmanifested: it never loads, and
        # the next save removes it.
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
        if _rank() == 0:
            known, write_s = read_parts(write.directory)
            shutil.rmtree(write.directory / PARTS, ignore_errors=True)
            manifest = write_manifest(write.directory, {"step": write.step, **write.meta}, known)
            if target.exists():      # re-saving a step: the new one replaces it atomically
                shutil.rmtree(target)
            os.replace(write.directory, target)
            fsync(self.save_dir)   # the rename itself is durable
            self._retain()
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
        """Every checkpoint directory, newest first, with whether it would load and why not."""
        entries = []
        if not self.save_dir.is_dir():
            return entries
        for path in self.save_dir.iterdir():
            match = NAME.match(path.name)
            if not match:
                continue
            manifest, reason = verify(path, checksums)
            entries.append({"name": path.name, "step": int(match.group(1)), "path": str(path),
                            "ok": reason is None, "reason": reason,
                            "bytes": sum(f["bytes"] for f in manifest["files"].values())
                            if manifest else None})
        return sorted(entries, key=lambda e: e["step"], reverse=True)

    def load(self, name_or_path: str | os.PathLike, model=None,
             optimizer=None) -> CheckpointState:
        """The verified checkpoint; given ``model`` and ``optimizer`` (as passed to ``save``),
        their state is loaded from it too (collective)."""
        state = self._verified(name_or_path)
        if model is not None or optimizer is not None:
            from .model_weights import load_model_weights
            from .optimizer_state import load_optimizer_state
            if model is not None:
                load_model_weights(model if isinstance(model, (list, tuple)) else [model],
                                   state.path / "model")
            if optimizer is not None and hasattr(optimizer, "kind"):
                load_optimizer_state(optimizer, state.path / "optimizer")
            elif optimizer is not None:
                optimizer.load_state_dict(load_torch_optimizer_state(state.path))
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
        manifest, reason = verify(path)
        if reason:
            raise CheckpointError(f"{path}: {reason}")
        state = json.loads((path / "state.json").read_text())
        return CheckpointState(path=path, step=int(state["step"]), state=state, manifest=manifest)

    def load_latest(self) -> CheckpointState | None:
        """The newest checkpoint that verifies; each one skipped is logged with its reason."""
        for entry in self.list():
            if entry["ok"]:
                return self.load(entry["path"])
            log.warning("skipping %s: %s", entry["path"], entry["reason"])
        return None

    # ------------------------------------------------------------------ retention
    def _retain(self) -> None:
        """Keep the newest ``keep_last_n`` good checkpoints plus every ``keep_every``-th step."""
        good = [e for e in self.list(checksums=False) if e["ok"]]
        for entry in good[self.keep_last_n:]:
            if self.keep_every and entry["step"] % self.keep_every == 0:
                continue
            shutil.rmtree(entry["path"], ignore_errors=True)


def load_torch_optimizer_state(path: Path) -> dict:
    """This rank's state of a plain torch optimizer, as ``save()`` wrote it (tensors and
    numbers only: ``weights_only``)."""
    file = path / "optimizer" / f"rank-{_rank():05d}.pt"
    if not file.is_file():
        raise CheckpointError(f"{path}: holds no plain torch optimizer state for this rank "
                              f"(no {file.relative_to(path)})")
    return torch.load(file, map_location="cpu", weights_only=True)


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
