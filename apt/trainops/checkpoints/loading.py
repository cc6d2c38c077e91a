"""Loading a checkpoint, verified first (CheckpointManager's last job).

A checkpoint named by the user, or the newest one of the run's lineage that verifies, is
verified as a whole (verification.py) before anything in it is read; the model and optimizer
then read only what that verification read, compared with its manifest (checked_reader.py).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .directory import last_lineage, scan
from .errors import CheckpointError
from .listing import list_checkpoints
from .manifest import read_manifest
from .ranks import rank
from .verification import CheckpointState, verify_checkpoint

log = logging.getLogger("apt.trainops.checkpoints.manager")


def verified(save_dir: Path, name_or_path: str | os.PathLike) -> CheckpointState:
    """The checkpoint at ``name_or_path`` (a path, or a name under ``save_dir``), verified;
    CheckpointError naming what the directory meant holds instead when there is none."""
    given = path = Path(name_or_path)
    if not path.is_absolute() and not path.exists():
        path = save_dir / path
    if not path.is_dir():
        # Name the path as given (a relative path that exists nowhere is not "under
        # save_dir" either) and what the directory the user meant holds instead.
        where = given.parent if given.parent.is_dir() and given.parent != Path(".") \
            else save_dir
        names = [e["name"] for e in list_checkpoints(where, checksums=False)]
        raise CheckpointError(f"{given}: no such checkpoint; {where} holds "
                              f"{', '.join(names) if names else 'no checkpoints'}")
    # Named explicitly, a link to a checkpoint is followed (only listing and auto-resume,
    # which choose for the user, skip links); what is inside may hold none.
    state, reason = verify_checkpoint(path.resolve())
    if reason:
        raise CheckpointError(f"{path}: {reason}")
    return state


def newest_verified(save_dir: Path, lineage: str | None
                    ) -> tuple[CheckpointState | None, str | None]:
    """The newest checkpoint of ``lineage`` that verifies (each one skipped is logged with its
    reason; only that one is hashed in full, once), and the lineage looked for: without one,
    that of the directory's last commit (directory.last_lineage), the run that was
    interrupted. Checkpoints of other lineages, symlinks and refused directories are never
    chosen."""
    found = [f for f in scan(save_dir) if not f["symlink"]]
    lineage = lineage or last_lineage(save_dir, found)
    for entry in found:
        if entry["refused"]:
            log.warning("refusing %s: %s", entry["path"], entry["refused"])
            continue
        if entry["readable"] and entry["lineage"] != lineage:
            continue
        state, reason = verify_checkpoint(entry["path"])
        if reason is None:
            return state, lineage
        log.warning("skipping %s: %s", entry["path"], reason)
    return None, lineage


def load_state(state: CheckpointState, model=None, optimizer=None) -> None:
    """Collective: ``model`` and ``optimizer`` (as passed to CheckpointManager.save) read from
    the verified checkpoint ``state``."""
    from .model_weights import load_model_weights
    from .optimizer_state import load_optimizer_state
    if model is not None:
        load_model_weights(model if isinstance(model, (list, tuple)) else [model],
                           state.path / "model", verified=True, manifest=state.manifest)
    if optimizer is not None and hasattr(optimizer, "kind"):
        load_optimizer_state(optimizer, state.path / "optimizer", verified=True,
                             manifest=state.manifest)
    elif optimizer is not None:
        optimizer.load_state_dict(load_torch_optimizer_state(state.path, state.manifest))


def load_torch_optimizer_state(path: Path, manifest: dict | None = None) -> dict:
    """This rank's state of a plain torch optimizer, as ``save()`` wrote it (tensors and
    numbers only), read once and compared with ``manifest``'s entry (the verified one)."""
    from .checked_reader import load_checked_torch_file
    file = path / "optimizer" / f"rank-{rank():05d}.pt"
    if not file.is_file():
        raise CheckpointError(f"{path}: holds no plain torch optimizer state for this rank "
                              f"(no {file.relative_to(path)})")
    entry = (manifest or read_manifest(path)[0] or {"files": {}})["files"].get(
        file.relative_to(path).as_posix())
    if entry is None:
        raise CheckpointError(f"{file}: not listed in the checkpoint's manifest")
    return load_checked_torch_file(file, entry)
