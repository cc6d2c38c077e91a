"""The manifest that makes a checkpoint count: written last, after every shard is on disk.

A directory without a manifest, or whose files differ from it in size or SHA-256, is not a
checkpoint: loading refuses it and ``load_latest`` skips it, saying why.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
# 1: model/ (dist_checkpointing), optimizer/ (engine-specific, dist_checkpointing),
#    trainer/rank-*.pt (RNG), state.json.
MANIFEST_VERSION = 1
SUPPORTED_VERSIONS = (1,)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync(path: Path) -> None:
    """Flush a file or directory to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_entry(path: Path) -> dict:
    """Fsync one file and describe it for the manifest: size and SHA-256."""
    fsync(path)
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def write_manifest(directory: Path, meta: dict, known: dict | None = None) -> dict:
    """Fsync every file, then write manifest.json (size + SHA-256 of each file) and fsync it.

    ``known``: entries the writers already computed (relative name -> file_entry), e.g. by the
    background writer of the rank that wrote the file; a file whose size no longer matches its
    known entry is hashed again here."""
    files, known = {}, known or {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = str(path.relative_to(directory))
        entry = known.get(name)
        if entry is None or entry["bytes"] != path.stat().st_size:
            entry = file_entry(path)
        files[name] = entry
    manifest = {"version": MANIFEST_VERSION, **meta, "files": files}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    fsync(tmp)
    os.replace(tmp, directory / MANIFEST)
    for sub in [directory] + [p for p in directory.rglob("*") if p.is_dir()]:
        fsync(sub)
    return manifest


def verify(directory: Path, checksums: bool = True) -> tuple[dict | None, str | None]:
    """(manifest, None) if the checkpoint is complete and intact, else (None, reason).
    ``checksums=False`` checks presence and sizes only (cheap: retention decisions)."""
    path = directory / MANIFEST
    if not path.is_file():
        return None, "incomplete: no manifest (the save did not finish)"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return None, f"unreadable manifest: {exc}"
    if manifest.get("version") not in SUPPORTED_VERSIONS:
        return None, (f"manifest version {manifest.get('version')} is not one this APT reads "
                      f"({SUPPORTED_VERSIONS})")
    for name, expected in manifest["files"].items():
        file = directory / name
        if not file.is_file():
            return None, f"missing file {name}"
        if file.stat().st_size != expected["bytes"]:
            return None, (f"{name} has {file.stat().st_size} bytes, the manifest says "
                          f"{expected['bytes']} (truncated or altered)")
        if checksums and _sha256(file) != expected["sha256"]:
            return None, f"{name} checksum differs from the manifest (corrupted or altered)"
    return manifest, None
