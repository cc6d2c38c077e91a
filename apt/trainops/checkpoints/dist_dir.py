"""A dist_checkpointing directory checked for loading: every file opened once, and what was
checked is what is read.

``check_dist_checkpoint`` opens each file of the directory once (no symlinks, only the names
dist_checkpointing writes) and, through that one open file:
- ``.metadata``: read into memory, compared with the manifest (when the directory is part of a
  checkpoint), scanned and built as plain data (safe_unpickle.py);
- ``common.pt``: read into memory, compared, scanned; its bytes are what is loaded;
- each ``*.distcp`` shard: hashed through the open file and kept open; the items the metadata
  names must tile it exactly (no bytes that no item covers: nothing unchecked hides there), and
  every byte item is scanned.

The result (``CheckedDir``) is what checked_reader.py loads from: the metadata object, common's
bytes and the open shards, so a file swapped after the check is never read.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .safe_unpickle import (METADATA_GLOBALS, UnsafeCheckpointError, load_metadata,
                            scan_pickle, scan_torch_file)

ALTERED = "differs from its manifest entry (altered since it was verified)"
SHARD_FILE = re.compile(r"^__\d+_\d+\.distcp$")
# The files a dist_checkpointing directory of this code holds (apt_model.json: ours).
DIST_FILES = re.compile(r"^(\.metadata|metadata\.json|common\.pt|apt_model\.json|"
                        r"__\d+_\d+\.distcp)$")


@dataclass
class CheckedDir:
    directory: Path
    metadata: object                 # torch Metadata, built as plain data
    common: bytes | None             # common.pt as checked
    shards: dict = field(default_factory=dict)   # shard name -> open fd (the checking rank)

    def read(self, name: str, offset: int, length: int) -> bytes:
        """Bytes of a shard: through the checked open file; on a rank that did not check (it
        reads other slices of a shared file system), opened now, without following links."""
        fd = self.shards.get(name)
        if fd is None:
            fd = self.shards[name] = _open(self.directory / name)
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise UnsafeCheckpointError(f"{self.directory / name}: shorter than when checked")
        return data

    def close(self) -> None:
        shards, self.shards = self.shards, {}
        for fd in shards.values():
            os.close(fd)

    def __del__(self):
        self.close()

    def __getstate__(self):   # sent to other ranks: the data, not this rank's open files
        return {"directory": self.directory, "metadata": self.metadata, "common": self.common,
                "shards": {}}


def check_dist_checkpoint(directory: str | Path, files: dict | None = None) -> CheckedDir:
    """Raise UnsafeCheckpointError unless nothing in this dist_checkpointing directory can run
    code when loaded; ``files``: the manifest's entries for it (name -> bytes, sha256), which
    every file read must match. Returns the CheckedDir to load from (close it when done)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UnsafeCheckpointError(f"{directory}: not a directory")
    for path in directory.iterdir():
        if path.is_symlink() or not path.is_file() or not DIST_FILES.match(path.name):
            raise UnsafeCheckpointError(f"{path}: refusing to load {directory}: "
                                        f"dist_checkpointing does not write this")
    _check_backends(directory / "metadata.json", read_checked(directory, "metadata.json", files))
    data = read_checked(directory, ".metadata", files)
    scan_pickle(data, METADATA_GLOBALS, directory / ".metadata")
    checked = CheckedDir(directory, load_metadata(data, directory / ".metadata"), None)
    try:
        _check_storage(checked, files)
        if (directory / "common.pt").exists():
            checked.common = read_checked(directory, "common.pt", files)
            scan_torch_file(checked.common, directory / "common.pt")
    except BaseException:
        checked.close()
        raise
    return checked


def _check_backends(path: Path, data: bytes) -> None:
    """Megatron picks its load strategy from metadata.json: only the one checked here."""
    try:
        backends = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise UnsafeCheckpointError(f"{path}: unreadable ({exc})") from None
    if not isinstance(backends, dict) or backends.get("sharded_backend") != "torch_dist" or \
            backends.get("common_backend") != "torch":
        raise UnsafeCheckpointError(f"{path}: refusing it: only the torch_dist sharded and "
                                    f"torch common backends are read")


def _check_storage(checked: CheckedDir, files: dict | None) -> None:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata
    directory, metadata = checked.directory, checked.metadata
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict) or \
            not isinstance(metadata.state_dict_metadata, dict):
        raise UnsafeCheckpointError(f"{directory / '.metadata'}: refusing it: not "
                                    f"torch.distributed.checkpoint Metadata")
    byte_keys = {key for key, value in metadata.state_dict_metadata.items()
                 if isinstance(value, BytesStorageMetadata)}
    sizes: dict[str, int] = {}
    spans: dict[str, list] = {}
    for index, info in metadata.storage_data.items():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or not SHARD_FILE.match(name):
            raise UnsafeCheckpointError(f"{directory / '.metadata'}: refusing it: item "
                                        f"{getattr(index, 'fqn', index)!r} is stored in "
                                        f"{name!r}, not a shard file of this directory")
        if getattr(info, "transform_descriptors", None):
            raise UnsafeCheckpointError(f"{directory / name}: item {index.fqn} is stored "
                                        f"transformed, so it cannot be checked")
        if name not in sizes:
            checked.shards[name] = fd = _open(directory / name)
            sizes[name] = os.fstat(fd).st_size
            _compare(directory, name, fd, files)
        offset, length = info.offset, info.length
        if not (isinstance(offset, int) and isinstance(length, int) and 0 <= offset
                and 0 <= length and offset + length <= sizes[name]):
            raise UnsafeCheckpointError(f"{directory / name}: item {index.fqn} lies outside "
                                        f"the file")
        spans.setdefault(name, []).append((offset, length))
        if index.fqn in byte_keys:
            scan_torch_file(checked.read(name, offset, length),
                            f"{directory / name} (item {index.fqn})")
    for path in directory.iterdir():
        if SHARD_FILE.match(path.name) and path.name not in sizes:
            raise UnsafeCheckpointError(f"{path}: refusing {directory}: no item of its "
                                        f".metadata is stored in this file")
    for name, items in spans.items():   # torch writes items back to back: they tile the file
        end = 0
        for offset, length in sorted(items):
            if offset != end:
                raise UnsafeCheckpointError(
                    f"{directory / name}: refusing it: bytes {min(offset, end)}.."
                    f"{max(offset, end)} are {'covered twice' if offset < end else 'not an item'}"
                    f" of its .metadata")
            end = offset + length
        if end != sizes[name]:
            raise UnsafeCheckpointError(f"{directory / name}: refusing it: bytes {end}.."
                                        f"{sizes[name]} are not an item of its .metadata")


def _open(path: Path) -> int:
    """A plain file opened for reading, never through a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise UnsafeCheckpointError(f"{path}: missing (or not a plain file): "
                                    f"{exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeCheckpointError(f"{path}: not a plain file")
    return fd


def read_checked(directory: Path, name: str, files: dict | None) -> bytes:
    """The whole file, read once through one open file, compared with its manifest entry."""
    fd = _open(directory / name)
    try:
        size = os.fstat(fd).st_size
        if files is not None and size != _entry(directory, name, files)["bytes"]:
            raise UnsafeCheckpointError(f"{directory / name}: {ALTERED}")
        data = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    if files is not None and hashlib.sha256(data).hexdigest() != \
            _entry(directory, name, files)["sha256"]:
        raise UnsafeCheckpointError(f"{directory / name}: {ALTERED}")
    return data


def _compare(directory: Path, name: str, fd: int, files: dict | None) -> None:
    """Hash an open shard against its manifest entry (the same open file is read to load)."""
    if files is None:
        return
    entry, digest, offset = _entry(directory, name, files), hashlib.sha256(), 0
    while True:
        block = os.pread(fd, 1 << 22, offset)
        if not block:
            break
        digest.update(block)
        offset += len(block)
    if offset != entry["bytes"] or digest.hexdigest() != entry["sha256"]:
        raise UnsafeCheckpointError(f"{directory / name}: {ALTERED}")


def _entry(directory: Path, name: str, files: dict) -> dict:
    if name not in files:
        raise UnsafeCheckpointError(f"{directory / name}: not listed in the manifest")
    return files[name]
