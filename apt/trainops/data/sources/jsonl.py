"""JSONL records (SFT chats, preference pairs, prompts, ``trainops preprocess`` documents) read
as untrusted data: each line parsed once, a bad line one ``DataError`` naming ``file:line``."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError


def iter_jsonl(path):
    """(``file:line``, record) for each non-blank line; a bad line is a one-line DataError."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no}", f"invalid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_no}", "a record must be a JSON object")
            yield f"{path}:{line_no}", record


def read_located_jsonl(path) -> list[tuple[str, dict]]:
    """(``file:line``, record) of every record; a missing or empty file is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    records = list(iter_jsonl(path))
    if not records:
        raise DataError(path, "empty dataset: no records")
    return records
