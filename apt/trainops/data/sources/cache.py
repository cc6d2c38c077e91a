"""Index files built once and shared: the first process (rank 0 when a process group exists)
builds, writes atomically (temp file + rename), the others wait at a barrier and memory-map.

Cached content is a pure function of its key, so two machines racing to build it write the same
bytes and the rename makes either result whole."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np


def cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_fingerprint(path: str) -> list:
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


def _is_builder() -> bool:
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cached_array(directory: str | os.PathLike, name: str, build) -> np.ndarray:
    """``build()`` -> array, stored once as ``<directory>/<name>.npy`` and memory-mapped."""
    path = Path(directory) / f"{name}.npy"
    if not path.exists() and _is_builder():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, build())
        os.replace(tmp, path)
    _barrier()
    if not path.exists():  # a rank whose filesystem is not shared with rank 0: build locally
        return build()
    return np.load(path, mmap_mode="r")


def cached_json(directory: str | os.PathLike, name: str, build) -> dict:
    path = Path(directory) / f"{name}.json"
    if not path.exists() and _is_builder():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(build()))
        os.replace(tmp, path)
    _barrier()
    return json.loads(path.read_text()) if path.exists() else build()
