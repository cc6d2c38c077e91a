"""What a checkpoints directory holds, judged by what each checkpoint holds, never by its name
or by a time written inside it.

- A ``checkpoint-<N>`` directory counts only if its manifest's step is N (loading also checks
  state.json's step against both: verification.py). Any other is *refused*: listed with the
  reason, never loaded, never counted by retention, never deleted.
- The run's lineage order is its steps. Auto-resume takes the lineage of this directory's last
  commit, which each commit records in ``.apt-last-commit.json`` (the run's own file, beside
  its checkpoints); only without that record does it fall back to the manifests' commit times,
  and then a time later than now counts for nothing.
- A rewind (resuming a checkpoint while the same lineage has newer ones) starts a branch: the
  newer ones move under ``superseded/``, and the log says which.
- Retention deletes only older checkpoints of this lineage: never the one just saved, never a
  newer one.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from .manifest import MANIFEST, fsync, read_manifest, verify

log = logging.getLogger("apt.trainops.checkpoints.manager")
NAME = re.compile(r"^checkpoint-(\d+)$")
LAST_COMMIT = ".apt-last-commit.json"
SUPERSEDED = "superseded"


def scan(save_dir: Path) -> list[dict]:
    """checkpoint-<step> entries, newest first: name, step, path, symlink, and from the
    manifest alone (nothing else is read) readable, lineage, committed (a time), refused (why
    the directory is no checkpoint at all: its number is not the step it holds)."""
    if not save_dir.is_dir():
        return []
    found = []
    for path in save_dir.iterdir():
        match = NAME.match(path.name)
        if not match:
            continue
        step, symlink = int(match.group(1)), path.is_symlink()
        manifest = None if symlink else read_manifest(path)[0]
        committed = refused = None
        if manifest is not None:
            committed = manifest.get("committed_at") or (path / MANIFEST).stat().st_mtime
            if manifest.get("step") != step:
                refused = (f"holds step {manifest.get('step')}, not {step}: a checkpoint's "
                           f"directory is named after the step it holds")
        found.append({"name": path.name, "step": step, "path": path, "symlink": symlink,
                      "readable": manifest is not None and refused is None,
                      "lineage": manifest.get("lineage") if manifest else None,
                      "committed": committed, "refused": refused})
    return sorted(found, key=lambda e: e["step"], reverse=True)


def record_commit(save_dir: Path, lineage: str, step: int) -> None:
    """After a commit (rank 0): this directory's last commit was this lineage's ``step``."""
    tmp = save_dir / (LAST_COMMIT + ".tmp")
    tmp.write_text(json.dumps({"lineage": lineage, "step": step}))
    os.replace(tmp, save_dir / LAST_COMMIT)


def last_lineage(save_dir: Path, found: list[dict]) -> str | None:
    """The lineage auto-resume continues (see the module's docstring)."""
    readable = [f for f in found if f["readable"]]
    try:
        record = json.loads((save_dir / LAST_COMMIT).read_text())
        if isinstance(record, dict) and any(f["lineage"] == record.get("lineage")
                                            for f in readable):
            return record["lineage"]
    except (OSError, ValueError, RecursionError):
        pass
    now = time.time()
    dated = [f for f in readable if isinstance(f["committed"], (int, float))]
    if not dated:
        return None
    return max(dated, key=lambda f: f["committed"] if f["committed"] <= now + 60 else 0.0
               )["lineage"]


def supersede_newer(save_dir: Path, found: list[dict], lineage: str | None, step: int) -> list:
    """A rewind to ``step``: move this lineage's later checkpoints under superseded/ (nothing is
    deleted); returns where they went."""
    if lineage is None:
        return []
    moved = []
    for entry in found:
        if entry["readable"] and not entry["symlink"] and entry["lineage"] == lineage and \
                entry["step"] > step:
            target = _free(save_dir / SUPERSEDED / entry["name"])
            target.parent.mkdir(exist_ok=True)
            os.replace(entry["path"], target)
            moved.append(target)
    if moved:
        fsync(save_dir)
        log.warning("resuming step %d of a run that went on to step %d: its later "
                    "checkpoint(s) moved to %s (a new branch starts here; nothing deleted)",
                    step, max(int(NAME.match(p.name.split(".")[0]).group(1)) for p in moved),
                    ", ".join(str(p) for p in moved))
    return moved


def _free(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists() or candidate.is_symlink():
        candidate, n = path.with_name(f"{path.name}.{n}"), n + 1
    return candidate


def retain(save_dir: Path, lineage: str | None, saved_step: int, keep_last_n: int,
           keep_every: int | None) -> None:
    """Of this lineage only (never symlinks, refused directories or other runs' checkpoints):
    keep the newest ``keep_last_n`` good checkpoints plus every ``keep_every``-th step; never
    the one just saved (``saved_step``) nor any newer one."""
    own = [f for f in scan(save_dir) if f["readable"] and not f["symlink"]
           and lineage is not None and f["lineage"] == lineage]
    good = [f for f in own if verify(f["path"], checksums=False)[1] is None]
    for entry in good[keep_last_n:]:
        if entry["step"] >= saved_step or (keep_every and entry["step"] % keep_every == 0):
            continue
        shutil.rmtree(entry["path"], ignore_errors=True)


def describe_foreign(entry: dict) -> str:
    if entry["symlink"]:
        return " (a symlink)"
    if entry["refused"]:
        return f" (refused: {entry['refused']})"
    if not entry["readable"]:
        return " (no readable manifest)"
    return f" (lineage {entry['lineage'] or 'none: written before lineage ids'})"


def checkpoint_save_dir(cfg, directory: str | None = None) -> Path:
    """Where the run's checkpoints go: the argument, training.checkpoints.dir, else
    <output.dir>/<experiment or profile name>-checkpoints."""
    default = Path(cfg.output.dir) / f"{cfg.output.experiment_name or cfg.name}-checkpoints"
    return Path(directory or cfg.training.checkpoints.dir or default)
