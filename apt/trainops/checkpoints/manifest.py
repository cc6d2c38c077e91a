"""The manifest that makes a checkpoint count: written last, after every shard is on disk.

A directory without a manifest, or whose files differ from it (a file missing, unlisted,
of another size or SHA-256, a symlink anywhere), is not a checkpoint: loading refuses it and
``load_latest`` skips it, saying why. The manifest also carries the run's lineage (lineage.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path

MANIFEST = "manifest.json"
# 1: model/ (dist_checkpointing), optimizer/ (engine-specific, dist_checkpointing),
#    trainer/rank-*.pt (RNG), state.json.
MANIFEST_VERSION = 1
SUPPORTED_VERSIONS = (1,)
# Far above any real manifest (a few hundred bytes per file), far below what would hurt to parse.
MAX_MANIFEST_BYTES = 64 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _sha256(path: Path, limit: int | None = None) -> str:
    """The file's SHA-256; with ``limit``, of at most limit + 1 bytes (a file that grew past
    its listed size hashes differently, and is never read in full)."""
    digest, left = hashlib.sha256(), (1 << 62) if limit is None else limit + 1
    with open(path, "rb") as f:
        while left > 0:
            block = f.read(min(1 << 20, left))
            if not block:
                break
            digest.update(block)
            left -= len(block)
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


def verify(directory: Path, checksums: bool = True,
           hash_under: tuple[str, ...] | None = None) -> tuple[dict | None, str | None]:
    """(manifest, None) if the checkpoint is complete and intact, else (None, reason).

    Intact: the directory and everything in it are plain directories and files (no symlinks),
    the manifest lists exactly the files there (relative, normalised names: none missing, none
    unlisted), each with its listed size and SHA-256. A file's size is compared before it is
    read, and no more than the listed size is ever read. ``checksums=False`` skips the hashing
    (cheap: retention decisions); ``hash_under`` hashes only the files under these top-level
    names (a load that reads only those: the rest is still checked for presence and size)."""
    if directory.is_symlink():
        return None, "a symlink (only checkpoint directories themselves are read)"
    manifest, reason = read_manifest(directory)
    if reason:
        return None, reason
    on_disk, reason = _files_on_disk(directory)
    if reason:
        return None, reason
    listed = manifest["files"]
    for name in sorted(listed):
        if name not in on_disk:
            return None, f"missing file {name}"
    for name in sorted(on_disk):
        if name not in listed:
            return None, f"unlisted file {name} (the manifest does not cover it)"
    for name, expected in sorted(listed.items()):
        if on_disk[name] != expected["bytes"]:
            return None, (f"{name} has {on_disk[name]} bytes, the manifest says "
                          f"{expected['bytes']} (truncated or altered)")
    for name, expected in sorted(listed.items()):
        if not checksums or (hash_under is not None and name.split("/")[0] not in hash_under):
            continue
        if _sha256(directory / name, expected["bytes"]) != expected["sha256"]:
            return None, f"{name} checksum differs from the manifest (corrupted or altered)"
    return manifest, None


def read_manifest(directory: Path) -> tuple[dict | None, str | None]:
    """The manifest if it has the right shape, else (None, reason); reads no other file."""
    path = directory / MANIFEST
    if path.is_symlink() or not path.exists():
        return None, "incomplete: no manifest (the save did not finish)"
    try:
        if not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
            return None, f"{MANIFEST} is not a file of at most {MAX_MANIFEST_BYTES} bytes"
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        return None, f"unreadable manifest: {type(exc).__name__}: {str(exc)[:200]}"
    reason = _manifest_shape_error(manifest)
    return (None, f"malformed manifest: {reason}") if reason else (manifest, None)


def _manifest_shape_error(manifest) -> str | None:
    if not isinstance(manifest, dict):
        return "not a JSON object"
    if manifest.get("version") not in SUPPORTED_VERSIONS:
        return (f"manifest version {str(manifest.get('version'))[:40]} is not one this APT "
                f"reads ({SUPPORTED_VERSIONS})")
    for key, kind in (("step", int), ("lineage", str), ("committed_at", (int, float))):
        if key in manifest and (not isinstance(manifest[key], kind)
                                or isinstance(manifest[key], bool)):
            return f"{key} is not a {getattr(kind, '__name__', 'number')}"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return "files is not an object"
    for name, entry in files.items():
        reason = _name_error(name)
        if reason:
            return f"entry {name[:200]!r}: {reason}"
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
                and not isinstance(entry["bytes"], bool) and entry["bytes"] >= 0
                and isinstance(entry.get("sha256"), str) and _SHA256.match(entry["sha256"])):
            return f"entry {name!r} is not {{bytes: size, sha256: hex digest}}"
    return None


def _name_error(name: str) -> str | None:
    """Entries are relative, normalised paths inside the checkpoint."""
    parts = name.split("/")
    if not name or "\\" in name or "\0" in name or name.startswith("/") or \
            any(part in ("", ".", "..") for part in parts):
        return "not a relative, normalised path inside the checkpoint"
    if name == MANIFEST:
        return "the manifest cannot list itself"
    return None


def _files_on_disk(directory: Path) -> tuple[dict, str | None]:
    """relative name -> size of every file under ``directory`` but the manifest; a reason
    instead if anything there is a symlink or not a plain file or directory."""
    files = {}
    for root, dirs, names in os.walk(directory, followlinks=False):
        for name in dirs + names:
            path = Path(root, name)
            relative = path.relative_to(directory).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                return {}, f"{relative} is a symlink (a checkpoint holds only its own files)"
            if name in names and not stat.S_ISREG(mode):
                return {}, f"{relative} is not a plain file"
            if name in names and relative != MANIFEST:
                files[relative] = path.lstat().st_size
    return files, None
