"""Byte-level tokenizer: needs no files, round-trips any text exactly."""
from __future__ import annotations

import numpy as np

from apt.core.config.schema import BYTE_VOCAB


class ByteTokenizer:
    """Token i < 256 is byte i; specials follow. ``vocab_size`` counts only real tokens: the
    model's embedding may be padded larger (for tensor-parallel divisibility)."""

    name = "byte"
    eod_id = 256
    pad_id = 257
    vocab_size = BYTE_VOCAB

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def to_dict(self) -> dict:
        """What ``load_tokenizer`` needs to rebuild this tokenizer (there is no vocabulary file:
        token i < 256 is byte i)."""
        return {"type": self.name, "vocab_size": self.vocab_size, "byte_tokens": 256,
                "eod_id": self.eod_id, "pad_id": self.pad_id, "encoding": "utf-8"}

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


def build_tokenizer(name: str):
    if name == "byte":
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer {name!r}")


def load_tokenizer(path) -> "ByteTokenizer":
    """Rebuild a tokenizer from a run's tokenizer/tokenizer.json."""
    import json
    from pathlib import Path
    info = json.loads(Path(path).read_text())
    tokenizer = build_tokenizer(info["type"])
    if tokenizer.to_dict() != info:
        raise ValueError(f"{path}: describes {info}, which this version builds differently")
    return tokenizer
