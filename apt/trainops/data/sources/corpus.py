"""Offline corpora: documents a run can train on with no download."""
from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

_TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")


def stdlib_documents(max_bytes: int) -> list[tuple[str, str]]:
    """(name, text) of the Python standard library's source files, in a stable order.

    Tests and vendored packages are left out (they repeat boilerplate and vary between
    installs); the order is sorted by path so every machine with the same Python sees the same
    corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo"}
    paths = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    return _read(paths, root, max_bytes)


def text_documents(path: str, max_bytes: int) -> list[tuple[str, str]]:
    """Every text file under ``path`` (or the file itself), one document per file."""
    base = Path(path)
    if not base.exists():
        raise FileNotFoundError(f"data.path: {base} does not exist")
    paths = [base] if base.is_file() else sorted(
        p for p in base.rglob("*") if p.is_file() and p.suffix in _TEXT_SUFFIXES)
    documents = _read(paths, base if base.is_dir() else base.parent, max_bytes)
    if not documents:
        raise ValueError(f"data.path: no text documents under {base}")
    return documents


def _read(paths, root: Path, max_bytes: int) -> list[tuple[str, str]]:
    documents, total = [], 0
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        if total + len(text) > max_bytes:
            break
        documents.append((str(path.relative_to(root)), text))
        total += len(text)
    return documents


def is_validation(name: str, val_fraction: float) -> bool:
    """Stable split by document name, independent of corpus order and size cap."""
    digest = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    return digest / 0xFFFFFFFF < val_fraction
