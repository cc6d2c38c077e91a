"""Refuse checkpoint files that would run code when loaded, before anything unpickles them.

A dist_checkpointing directory holds three kinds of pickles. ``common.pt`` goes through
``torch.load`` with its weights_only default, which is safe. Two are loaded unrestricted:
- ``.metadata``: torch.distributed.checkpoint reads it with a bare ``pickle.load``;
- byte items inside ``*.distcp`` (Megatron ShardedObjects such as a layer's ``_extra_state``):
  its load planner uses ``torch.load(..., weights_only=False)``.
``check_dist_checkpoint`` unpickles the first kind with an allow-list of the checkpoint
metadata classes, and the others with ``weights_only=True``. A file naming anything else
(``os.system``, ``builtins.eval``, ...) is refused with its name, and nothing in it runs.
The manifest's checksums catch damage; this check is what stops a crafted checkpoint, even one
whose manifest was rewritten to match.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

from .manager import CheckpointError

# What torch.distributed.checkpoint's .metadata pickles name (measured on torch 2.13: Metadata,
# its storage and planner records, torch.Size, dtypes, the layout helper).
_ALLOWED_MODULES = ("torch.distributed.checkpoint.",)
_ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"),
            ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
            *{("torch", str(dtype).removeprefix("torch.")) for dtype in (
                torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)},
            *{("torch", name) for name in ("strided", "sparse_coo", "contiguous_format",
                                           "channels_last", "preserve_format")}}


class UnsafeCheckpointError(CheckpointError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module.startswith(_ALLOWED_MODULES) or (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint metadata type")


def check_dist_checkpoint(directory: str | Path) -> None:
    """Raise UnsafeCheckpointError if a pickle in this dist_checkpointing directory would run
    code when loaded (reads .metadata, common.pt and the byte items; tensors are not read)."""
    directory = Path(directory)
    metadata = _load_metadata(directory / ".metadata")
    if metadata is not None:
        _check_byte_items(directory, metadata)
    for torch_file in directory.glob("*.pt"):
        _weights_only(torch_file.read_bytes(), torch_file)


def _load_metadata(path: Path):
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(f"{path}: refusing to unpickle it: {exc}") from None


def _check_byte_items(directory: Path, metadata) -> None:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    byte_keys = {key for key, value in metadata.state_dict_metadata.items()
                 if isinstance(value, BytesStorageMetadata)}
    for index, info in (metadata.storage_data or {}).items():
        if index.fqn not in byte_keys:
            continue
        if getattr(info, "transform_descriptors", None):
            raise UnsafeCheckpointError(f"{directory / info.relative_path}: item {index.fqn} is "
                                        f"stored transformed, so it cannot be checked")
        with open(directory / info.relative_path, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        _weights_only(data, f"{directory / info.relative_path} (item {index.fqn})")


def _weights_only(data: bytes, where) -> None:
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is long; its line naming the offending global is the useful one.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = next((line for line in lines if "unsupported" in line.lower()),
                      lines[0] if lines else "")
        raise UnsafeCheckpointError(f"{where}: refusing to unpickle it: it is not plain "
                                    f"tensors and containers ({reason})") from None
