"""CheckpointManager: atomic, verified, retained checkpoints.

    <save_dir>/checkpoint-<step>/
        manifest.json        written last: version, step, lineage, files with size + SHA-256
        state.json           step, consumed samples, config + hash, layout, versions
        model/               model weights, Megatron dist_checkpointing (reshards on load)
        optimizer/           optimizer state in model space (optimizer_state.py)
        trainer/rank-N.pt    each rank's RNG states (tensors and numbers only)

The class holds a run's checkpoint settings and state (directory, lineage, the pending save)
and composes one module per job:
- writing.py: a save writes into a temporary directory, never loaded until committed;
- commit.py: once every rank has finished and every file is fsynced, rank 0 writes the
  manifest and renames the directory, then retention (directory.py) deletes this lineage's
  older checkpoints. A crash at any point leaves either the previous checkpoints untouched or
  a temporary directory that is never loaded (and removed by the next save of the lineage);
- lineage.py: at a run's start, checkpoints of other runs are reported, one in the way refuses
  the start, and a rewind moves the lineage's later checkpoints under superseded/;
- listing.py: what a directory holds, and whether each would load;
- loading.py: loading verifies the whole checkpoint first (verification.py).

Lineage: a run gets an id when it starts (a resumed run keeps its checkpoint's), written into
every manifest. Retention and auto-resume consider only checkpoints of this lineage, judged by
what they hold (directory.py): another run's checkpoints, symlinks, or a directory whose number
is not the step it holds are never deleted, replaced or resumed from automatically.

With ``async_save`` the caller waits only while the shards are planned and copied to host
memory; a forked writer per rank writes and checksums them (background.py) and ``wait()``, a
collective the training loop calls once every rank's writer is done, commits the checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch

from .background import start_writer_warmup
from .commit import commit_write
from .directory import scan, supersede_newer
from .errors import CheckpointError
from .lineage import new_lineage, refuse_foreign, will_save
from .listing import list_checkpoints
from .loading import load_state, newest_verified, verified
from .manifest import MANIFEST_VERSION
from .ranks import rank
from .verification import CheckpointState
from .writing import CheckpointWrite, check_writable, open_write, start_writes


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
        if rank() == 0:
            self.lineage = self.lineage or new_lineage()
        write = open_write(self.save_dir, self.lineage, step, meta or {}, started=start)
        yield write
        # An exception above leaves the temporary directory unmanifested: it never loads, and
        # the next save of this lineage removes it.
        start_writes(write, background=self.async_save)
        write.stall_s = time.perf_counter() - start
        self._pending = write
        if not self.async_save:
            self.wait()

    def writing_in_background(self) -> bool:
        """Whether this rank's writer for the pending checkpoint is still running (local)."""
        return self._pending is not None and self._pending.writer.running()

    def wait(self) -> Path | None:
        """Collective: commit the pending checkpoint once every rank's writer is done
        (commit.py). Returns the checkpoint's path, None if nothing was pending. Raises
        CheckpointError on every rank if any rank failed to write its shards."""
        write, self._pending = self._pending, None
        if write is None:
            return None
        # Rank 0's lineage was set when the write began (writing()).
        cost = commit_write(write, self.save_dir, self.lineage, keep_last_n=self.keep_last_n,
                            keep_every=self.keep_every, synchronous=not self.async_save)
        if cost is not None:
            self.last_save = cost
        return write.committed

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
        from apt.trainops.runtime.process_groups import ensure_runtime
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
                           ckpt.directory / "optimizer" / f"rank-{rank():05d}.pt")
            if rank() == 0:
                (ckpt.directory / "state.json").write_text(json.dumps({"step": step, **extra}))
        return self.save_dir / f"checkpoint-{step}"

    # ------------------------------------------------------------------ finding and loading
    def list(self, checksums: bool = True) -> list[dict]:
        """Every checkpoint directory, newest first, with whether it would load and why not
        (``checksums``: the full verification loading runs, else manifest and sizes only)."""
        return list_checkpoints(self.save_dir, checksums)

    def load(self, name_or_path: str | os.PathLike, model=None,
             optimizer=None) -> CheckpointState:
        """The verified checkpoint (its lineage continues in this manager's saves); given
        ``model`` and ``optimizer`` (as passed to ``save``), their state is loaded from it too
        (collective)."""
        state = verified(self.save_dir, name_or_path)
        self.continue_lineage(state)
        if model is not None or optimizer is not None:
            load_state(state, model, optimizer)
        return state

    def load_latest(self) -> CheckpointState | None:
        """The newest checkpoint of this run's lineage that verifies (each one skipped is
        logged with its reason); only that one is hashed in full, once.

        Without a lineage yet (a run starting with auto-resume), the lineage is that of the
        directory's last commit (directory.last_lineage): the run that was interrupted.
        Checkpoints of other lineages, symlinks and refused directories are never chosen."""
        state, lineage = newest_verified(self.save_dir, self.lineage)
        if state is not None:
            self.continue_lineage(state)
            return state
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
        found = scan(self.save_dir)
        start = resumed.step if resumed is not None else 0
        refuse_foreign(self.save_dir, found, self.lineage,
                       lambda step: will_save(step, start, self.save_interval, self.last_step))
        if rewind and resumed is not None and Path(resumed.path).parent.resolve() == \
                self.save_dir.resolve():
            supersede_newer(self.save_dir, found, self.lineage, resumed.step)

    def check_writable(self) -> None:
        """Raise CheckpointError now, rather than at the first save after the steps trained,
        if checkpoints cannot be written under save_dir."""
        check_writable(self.save_dir)


__all__ = ["CheckpointError", "CheckpointManager", "CheckpointState", "MANIFEST_VERSION"]
