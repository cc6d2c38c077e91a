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
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

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


class CheckpointManager:
    def __init__(self, save_dir: str | os.PathLike = "checkpoints", save_interval: int = 500,
                 keep_last_n: int = 5, keep_every: int | None = None):
        self.save_dir = Path(save_dir)
        self.save_interval, self.keep_last_n, self.keep_every = save_interval, keep_last_n, keep_every

    # ------------------------------------------------------------------ saving
    def should_save(self, step: int) -> bool:
        return bool(self.save_interval) and step % self.save_interval == 0

    @contextlib.contextmanager
    def writing(self, step: int, meta: dict | None = None):
        """Collective: every rank enters; yields the temporary directory to write into."""
        rank = _rank()
        target = self.save_dir / f"checkpoint-{step}"
        names = [None]
        if rank == 0:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.save_dir.glob(".tmp-checkpoint-*"):
                shutil.rmtree(stale, ignore_errors=True)   # an earlier crash's leftovers
            names[0] = str(self.save_dir / f".tmp-checkpoint-{step}-{uuid.uuid4().hex[:8]}")
            Path(names[0]).mkdir()
        _broadcast(names)
        tmp = Path(names[0])
        yield tmp
        _barrier()   # every rank's shards are written
        if rank == 0:
            write_manifest(tmp, {"step": step, **(meta or {})})
            if target.exists():      # re-saving a step: the new one replaces it atomically
                shutil.rmtree(target)
            os.replace(tmp, target)
            fsync(self.save_dir)   # the rename itself is durable
            self._retain()
        _barrier()

    def save(self, model=None, optimizer=None, step: int = 0, **extra) -> Path:
        """The seed API: ``save(model=model, optimizer=optimizer, step=1000)``.

        ``model``: an APTModel (or a list of model chunks); ``optimizer``: a training engine
        (apt.trainops.distributed.engines) or a plain torch optimizer."""
        from .model_weights import _sharded_state
        from .optimizer_state import save_optimizer_state
        from megatron.core import dist_checkpointing
        modules = model if isinstance(model, (list, tuple)) else [model] if model else []
        with self.writing(step, {"kind": "model+optimizer"}) as tmp:
            if modules:
                (tmp / "model").mkdir(exist_ok=True)
                _barrier()
                dist_checkpointing.save(_sharded_state(modules), str(tmp / "model"))
            if optimizer is not None and hasattr(optimizer, "kind"):
                save_optimizer_state(optimizer, tmp / "optimizer")
            elif optimizer is not None:
                (tmp / "optimizer").mkdir(exist_ok=True)
                torch.save(optimizer.state_dict(), tmp / "optimizer" / f"rank-{_rank():05d}.pt")
            if _rank() == 0:
                (tmp / "state.json").write_text(json.dumps({"step": step, **extra}))
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

    def load(self, name_or_path: str | os.PathLike) -> CheckpointState:
        path = Path(name_or_path)
        if not path.is_absolute() and not path.exists():
            path = self.save_dir / path
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such checkpoint")
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


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast(objects: list) -> None:
    if dist.is_initialized():
        dist.broadcast_object_list(objects, src=0)


__all__ = ["CheckpointError", "CheckpointManager", "CheckpointState", "MANIFEST_VERSION"]
