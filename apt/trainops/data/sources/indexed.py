"""Megatron's indexed dataset format (``.bin`` + ``.idx``), written and read without Megatron.

``<prefix>.bin`` holds every token back to back in one dtype. ``<prefix>.idx`` is, little-endian:

    b"MMIDIDX\\x00\\x00"  u64 version = 1  u8 dtype code  u64 sequence count S  u64 document count D
    int32[S] sequence lengths   int64[S] byte offsets into .bin   int64[D] document indices

``document_indices`` starts at 0 and ends at S: document j is sequences [doc[j], doc[j+1]).
APT writes one sequence per document (its tokens followed by the end-of-document token), as
Megatron-LM's ``preprocess_data.py --append-eod`` does, so files move freely between the two.
Reading checks every size and offset before anything is memory-mapped, so a truncated or
mismatched file is a ``DataError`` naming the file, not a crash mid-run.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from ..errors import DataError

HEADER = b"MMIDIDX\x00\x00"
_PREAMBLE = len(HEADER) + 8 + 1 + 8 + 8  # 34 bytes before the arrays
# Megatron's DType enum codes.
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
               7: np.float32, 8: np.uint16}
_CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
_TOKEN_DTYPES = {np.uint8, np.int8, np.int16, np.int32, np.int64, np.uint16}


def token_dtype(vocab_size: int):
    """The smallest dtype Megatron would pick for this vocabulary (uint16 below 65500)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def prefix_of(path: str | os.PathLike) -> str:
    """Accept ``data/x``, ``data/x.bin`` or ``data/x.idx`` for the prefix ``data/x``."""
    text = str(path)
    return text[:-4] if text.endswith((".bin", ".idx")) else text


class IndexedWriter:
    """Append documents, then ``close()`` writes the ``.idx``. Usable as a context manager; on an
    exception the partial files are removed so no half-written dataset is left behind."""

    def __init__(self, prefix: str | os.PathLike, dtype=np.uint16):
        self.prefix = prefix_of(prefix)
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        self._bin = open(self.prefix + ".bin", "wb")
        self._lengths: list[int] = []
        self.num_tokens = 0

    def add_document(self, tokens) -> None:
        array = np.asarray(tokens)
        if array.size and (array.min() < np.iinfo(self.dtype).min
                           or array.max() > np.iinfo(self.dtype).max):
            raise DataError(self.prefix + ".bin", f"token id {int(array.max())} does not fit "
                            f"the file's dtype {self.dtype.name}")
        self._bin.write(array.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(int(array.size))
        self.num_tokens += int(array.size)

    def close(self) -> None:
        self._bin.close()
        lengths = np.asarray(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        documents = np.arange(len(lengths) + 1, dtype=np.int64)
        tmp = self.prefix + ".idx.tmp"
        with open(tmp, "wb") as f:
            f.write(HEADER + struct.pack("<Q", 1) + struct.pack("<B", _CODE_OF[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(documents)))
            f.write(lengths.tobytes() + pointers.tobytes() + documents.tobytes())
        os.replace(tmp, self.prefix + ".idx")  # the .idx appears only once it is complete

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._bin.close()
            Path(self.prefix + ".bin").unlink(missing_ok=True)
        return None


class IndexedReader:
    """Memory-mapped, validated view of ``<prefix>.bin``/``.idx``.

    ``tokens`` is the whole ``.bin`` as one flat array (documents back to back);
    ``document_offsets[j]`` is the token index where document j starts (one entry more than
    documents)."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = prefix_of(prefix)
        self.idx_path, self.bin_path = self.prefix + ".idx", self.prefix + ".bin"
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise DataError(path, "file not found (an indexed dataset needs both "
                                      f"{Path(self.prefix).name}.bin and .idx)")
        idx_size = os.path.getsize(self.idx_path)
        with open(self.idx_path, "rb") as f:
            head = f.read(_PREAMBLE)
        if len(head) < len(HEADER) or head[:len(HEADER)] != HEADER:
            raise DataError(self.idx_path, "not an indexed-dataset index (bad magic header)")
        if len(head) < _PREAMBLE:
            raise DataError(self.idx_path, f"truncated index: {idx_size} bytes, the header "
                                           f"alone needs {_PREAMBLE}")
        version, code, seqs, docs = struct.unpack("<QBQQ", head[len(HEADER):])
        if version != 1:
            raise DataError(self.idx_path, f"unsupported index version {version} (expected 1)")
        if code not in DTYPE_CODES or DTYPE_CODES[code] not in _TOKEN_DTYPES:
            raise DataError(self.idx_path, f"unknown or non-integer token dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected_idx = _PREAMBLE + seqs * 4 + seqs * 8 + docs * 8
        if idx_size < expected_idx:
            raise DataError(self.idx_path, f"truncated index: {idx_size} bytes, but its header "
                                           f"declares {seqs} sequences and {docs} document "
                                           f"entries ({expected_idx} bytes)")
        idx = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        self.sequence_lengths = np.frombuffer(idx, np.int32, seqs, _PREAMBLE)
        self.sequence_pointers = np.frombuffer(idx, np.int64, seqs, _PREAMBLE + 4 * seqs)
        self.document_indices = np.frombuffer(idx, np.int64, docs, _PREAMBLE + 12 * seqs)
        self._check_index(seqs, docs)
        num_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        bin_size = os.path.getsize(self.bin_path)
        expected_bin = num_tokens * self.dtype.itemsize
        if bin_size < expected_bin:
            raise DataError(self.bin_path, f"truncated: {bin_size} bytes, but "
                                           f"{Path(self.idx_path).name} describes {num_tokens} "
                                           f"{self.dtype.name} tokens ({expected_bin} bytes)")
        if bin_size > expected_bin:
            raise DataError(self.bin_path, f"does not match {Path(self.idx_path).name}: "
                                           f"{bin_size} bytes, the index describes {expected_bin}"
                                           f" (index from another file?)")
        if num_tokens == 0:
            raise DataError(self.bin_path, "empty dataset: no tokens")
        self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r")
        starts = np.concatenate([self.sequence_pointers // self.dtype.itemsize,
                                 [num_tokens]]).astype(np.int64)
        self.document_offsets = starts[self.document_indices]

    def _check_index(self, seqs: int, docs: int) -> None:
        lengths, pointers, documents = (self.sequence_lengths, self.sequence_pointers,
                                        self.document_indices)
        if docs < 1 or documents[0] != 0 or documents[-1] != seqs:
            raise DataError(self.idx_path, f"corrupt document index: must run from 0 to the "
                                           f"sequence count {seqs}")
        if np.any(np.diff(documents) < 0):
            raise DataError(self.idx_path, "corrupt document index: not non-decreasing")
        if seqs and (lengths.min() < 0):
            raise DataError(self.idx_path, "corrupt index: negative sequence length")
        expected = np.zeros(seqs, dtype=np.int64)
        if seqs > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=expected[1:])
        if not np.array_equal(expected, pointers):
            bad = int(np.argmax(expected != pointers))
            raise DataError(self.idx_path, f"corrupt index: sequence {bad} points at byte "
                                           f"{int(pointers[bad])}, expected {int(expected[bad])}")

    @property
    def num_documents(self) -> int:
        return len(self.document_offsets) - 1

    def document(self, j: int) -> np.ndarray:
        return self.tokens[self.document_offsets[j]:self.document_offsets[j + 1]]

    def __len__(self) -> int:
        return self.num_documents
