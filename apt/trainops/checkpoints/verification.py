"""Whether a checkpoint loads: the one verification ``trainops checkpoints`` and every loading path
run, before anything in the checkpoint is unpickled.

1. The manifest (manifest.py): exactly the files on disk, no symlinks, sizes, SHA-256.
2. ``state.json``: a JSON object of the shape loading reads (bounded size and nesting).
3. Every pickle (safe_unpickle.py): nothing in it can run code.

It runs once per load: the Trainer verifies on rank 0 and hands the result to every rank
(trainers/checkpointing.py); what follows (model and optimizer loading) reads the verified files
without checking them again.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError
from .manifest import MANIFEST, verify
from .directory import NAME
from .dist_dir import check_dist_checkpoint
from .safe_unpickle import UnsafeCheckpointError, scan_torch_file

STATE = "state.json"
# The resolved config nests three levels; anything this deep is not a state APT wrote.
MAX_STATE_DEPTH = 32
# The parts loading reads, each a dist_checkpointing directory (other *.pt files: torch files).
DIST_PARTS = ("model", "optimizer")
# state.json keys loading reads, and their types.
_STATE_TYPES = {"step": int, "consumed_samples": int, "global_batch": int, "config": dict,
                "layout": dict, "model_contents": str, "loss_scalers": list}


@dataclass
class CheckpointState:
    """A verified checkpoint: what ``Trainer(resume_from_checkpoint=...)`` takes."""
    path: Path
    step: int
    state: dict      # state.json
    manifest: dict

    @property
    def lineage(self) -> str | None:
        """The id of the run (and its resumptions) that wrote it; None: written before ids."""
        return self.manifest.get("lineage")


def verify_checkpoint(path: Path, parts: tuple[str, ...] | None = None
                      ) -> tuple[CheckpointState | None, str | None]:
    """(state, None) if the checkpoint at ``path`` loads, else (None, the reason).

    ``parts``: only these top-level parts will be read (e.g. ``("model",)`` for weights):
    only they are hashed. Everything else is checked for every file (the pickles are small:
    .metadata, byte items, RNG states; the tensor data that makes a checkpoint big is not
    read)."""
    state, _, reason = _verify(Path(path), parts)
    return state, reason


def check_weights_dir(directory: str | Path):
    """The check before a dist_checkpointing weights directory is read (training.init_from,
    from_pretrained, export-hf): the whole checkpoint's verification, hashing and unpickling
    only this part, when it is a part of one (``checkpoint-N/model``); else (import-hf's or
    save_model_weights' output, no manifest) its pickles. Raises CheckpointError; returns the
    directory's checked torch Metadata."""
    directory = Path(directory).resolve()   # a path the user gave may be a link to weights
    checkpoint = directory.parent
    if directory.name in DIST_PARTS and (checkpoint / MANIFEST).exists():
        _, metadata, reason = _verify(checkpoint, (directory.name,))
        if reason:
            raise CheckpointError(f"{checkpoint}: {reason}")
        return metadata[directory.name]
    checked = check_dist_checkpoint(directory)
    checked.close()
    return checked.metadata


def _verify(path: Path, parts: tuple[str, ...] | None):
    """(state, {part: torch Metadata}, None) or (None, None, reason)."""
    manifest, reason = verify(path, hash_under=None if parts is None else (*parts, STATE))
    if reason:
        return None, None, reason
    state, reason = _read_state(path / STATE, manifest)
    if reason:
        return None, None, reason
    named = NAME.match(path.name)
    if named and int(named.group(1)) != state["step"]:
        return None, None, (f"holds step {state['step']}, not {named.group(1)}: a checkpoint's "
                            f"directory is named after the step it holds")
    try:
        metadata = check_pickles(path)
    except UnsafeCheckpointError as exc:
        return None, None, str(exc).replace(f"{path}/", "")   # its files, by relative name
    return (CheckpointState(path=path, step=state["step"], state=state, manifest=manifest),
            metadata, None)


def check_pickles(path: Path) -> dict:
    """Raise UnsafeCheckpointError if any pickle of the checkpoint could run code: its
    dist_checkpointing directories and every other ``*.pt`` file. Returns each
    dist_checkpointing part's checked torch Metadata."""
    metadata = {}
    for part in DIST_PARTS:
        if (path / part / "metadata.json").is_file():
            checked = check_dist_checkpoint(path / part)
            checked.close()
            metadata[part] = checked.metadata
    for file in sorted(path.rglob("*.pt")):
        if not (file.parent / "metadata.json").is_file():
            with open(file, "rb") as stream:   # header first; only data.pkl is read whole
                scan_torch_file(stream, file)
    return metadata


def _read_state(path: Path, manifest: dict) -> tuple[dict | None, str | None]:
    if STATE not in manifest["files"]:
        return None, f"no {STATE}"
    try:
        state = json.loads(path.read_bytes())   # its size was checked against the manifest
    except (OSError, ValueError, RecursionError) as exc:
        return None, f"unreadable {STATE}: {type(exc).__name__}: {str(exc)[:200]}"
    if not isinstance(state, dict):
        return None, f"malformed {STATE}: not a JSON object"
    if _depth(state) > MAX_STATE_DEPTH:
        return None, f"malformed {STATE}: nests deeper than {MAX_STATE_DEPTH} levels"
    for key, kind in _STATE_TYPES.items():
        value = state.get(key)
        if (key == "step" or value is not None) and (not isinstance(value, kind)
                                                     or isinstance(value, bool)):
            return None, f"malformed {STATE}: {key} is not a {kind.__name__}"
    if state["step"] < 0 or state["step"] != manifest.get("step", state["step"]):
        return None, (f"malformed {STATE}: step {state['step']} is not the manifest's "
                      f"{manifest.get('step')}")
    return state, None


def _depth(value) -> int:
    """How deeply JSON containers nest (iterative: a deep one must not exhaust the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > MAX_STATE_DEPTH:
                return deepest
            stack.extend((child, depth + 1)
                         for child in (item.values() if isinstance(item, dict) else item))
    return deepest
