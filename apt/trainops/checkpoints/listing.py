"""Listing a checkpoints directory (CheckpointManager.list, ``trainops checkpoints``): every
checkpoint directory, newest first, with whether it would load and why not."""
from __future__ import annotations

from pathlib import Path

from .directory import scan
from .manifest import verify
from .verification import CheckpointState, verify_checkpoint


def list_checkpoints(save_dir: Path, checksums: bool = True) -> list[dict]:
    """``checksums``: the full verification loading runs, else manifest and sizes only."""
    entries = []
    for found in scan(save_dir):
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
