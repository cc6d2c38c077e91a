"""``trainops preprocess``: text, JSONL and Parquet -> Megatron indexed dataset (``.bin`` + ``.idx``).

    trainops preprocess corpus/*.jsonl --field text --output data/web --tokenizer hf \\
        --tokenizer-path tokenizer.json --workers 8
    python -m apt preprocess books/ --output data/books --train-bpe 32000

Documents are read in order by this process and tokenized in ``--workers`` processes; results
come back in input order, so the output is the same for any worker count. Each document is
followed by the end-of-document token (Megatron's ``--append-eod``). The tokenizer is saved
next to the data as ``<output>.tokenizer/`` (``load_tokenizer`` reads it back).
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import DataError
from .jsonl import iter_jsonl
from .indexed import IndexedWriter, prefix_of, token_dtype
from ..tokenizers.tokenizer import build_tokenizer, train_bpe

_TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text"}
_worker_tokenizer = None


def input_files(inputs: list[str]) -> list[Path]:
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file()
                            and _format_of(p, "auto", strict=False))
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(path, "input not found")
    if not files:
        raise DataError(", ".join(inputs), "no input files")
    return files


def _format_of(path: Path, fmt: str, strict: bool = True) -> str | None:
    if fmt != "auto":
        return fmt
    suffixes = "".join(path.suffixes[-2:])
    if path.suffix in (".jsonl", ".json") or suffixes.endswith(".jsonl.gz"):
        return "jsonl"
    if path.suffix == ".parquet":
        return "parquet"
    if path.suffix in _TEXT_SUFFIXES or (strict and not path.suffix):
        return "text"
    if strict:
        raise DataError(path, f"cannot tell the format from suffix {path.suffix!r}: pass "
                              f"--format text|jsonl|parquet")
    return None


def read_documents(files: list[Path], fmt: str = "auto", field: str = "text"):
    """Yield each document's text, in file order."""
    for path in files:
        kind = _format_of(path, fmt)
        if kind == "text":
            try:
                yield path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(path, f"not UTF-8 text (byte {exc.start})") from None
        elif kind == "jsonl":
            for where, record in iter_jsonl(path):
                if field not in record:
                    raise DataError(where, f"record has no field {field!r}")
                if not isinstance(record[field], str):
                    raise DataError(where, f"field {field!r} is not a string")
                yield record[field]
        elif kind == "parquet":
            import pyarrow.parquet as pq
            try:
                table = pq.ParquetFile(path)
            except Exception as exc:
                raise DataError(path, f"not a Parquet file ({str(exc).splitlines()[0]})") from None
            if field not in table.schema_arrow.names:
                raise DataError(path, f"no column {field!r} (columns: "
                                      f"{', '.join(table.schema_arrow.names)})")
            for batch in table.iter_batches(columns=[field], batch_size=1024):
                yield from (t for t in batch.column(0).to_pylist() if t is not None)
        else:
            raise DataError(path, f"unknown format {kind!r}")


def _init_worker(name: str, path: str | None) -> None:
    global _worker_tokenizer
    _worker_tokenizer = build_tokenizer(name, path)


def _encode_chunk(texts: list[str]) -> tuple[list[np.ndarray], int]:
    tok = _worker_tokenizer
    encoded = tok.encode_batch(texts) if hasattr(tok, "encode_batch") else map(tok.encode, texts)
    return list(encoded), sum(len(t.encode("utf-8")) for t in texts)


def _chunks(iterable, size: int):
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def preprocess(inputs: list[str], output: str, *, tokenizer: str = "byte",
               tokenizer_path: str | None = None, fmt: str = "auto", field: str = "text",
               workers: int = 1, append_eod: bool = True, train_bpe_vocab: int | None = None,
               chunk_size: int = 64, progress: bool = True) -> dict:
    """Tokenize ``inputs`` into ``<output>.bin/.idx``; return the summary."""
    from tqdm import tqdm
    output = prefix_of(output)
    files = input_files(inputs)
    if train_bpe_vocab:
        tokenizer, tokenizer_path = "hf", output + ".tokenizer.json"
        train_bpe(read_documents(files, fmt, field), train_bpe_vocab, tokenizer_path)
    tok = build_tokenizer(tokenizer, tokenizer_path)
    dtype = token_dtype(tok.vocab_size)
    total_bytes = sum(f.stat().st_size for f in files)
    started = time.perf_counter()
    documents = tokens = text_bytes = 0
    eod = np.array([tok.eod_id], dtype=np.int64)
    chunks = _chunks(read_documents(files, fmt, field), chunk_size)
    pool = None
    if workers > 1:
        pool = multiprocessing.get_context("spawn").Pool(
            workers, initializer=_init_worker, initargs=(tokenizer, tokenizer_path))
        results = pool.imap(_encode_chunk, chunks)
    else:
        _init_worker(tokenizer, tokenizer_path)
        results = map(_encode_chunk, chunks)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess",
               disable=not progress, file=sys.stderr)
    try:
        with IndexedWriter(output, dtype) as writer:
            for encoded, nbytes in results:
                for ids in encoded:
                    writer.add_document(np.concatenate([ids, eod]) if append_eod else ids)
                documents += len(encoded)
                text_bytes += nbytes
                bar.update(min(nbytes, total_bytes - bar.n))
            tokens = writer.num_tokens
            if documents == 0:
                raise DataError(", ".join(map(str, files)), "empty dataset: no documents")
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    tok.save(output + ".tokenizer")
    seconds = time.perf_counter() - started
    return {"output": output, "files": len(files), "documents": documents, "tokens": tokens,
            "text_bytes": text_bytes, "bin_bytes": os.path.getsize(output + ".bin"),
            "dtype": np.dtype(dtype).name, "tokenizer": tok.name, "vocab_size": tok.vocab_size,
            "seconds": seconds, "tokens_per_s": tokens / seconds,
            "mb_per_s": text_bytes / seconds / 1e6}


def format_summary(s: dict) -> str:
    return (f"wrote {s['output']}.bin/.idx: {s['documents']:,} documents, {s['tokens']:,} tokens "
            f"({s['dtype']}, {s['tokenizer']} tokenizer, vocab {s['vocab_size']:,}), "
            f"{s['text_bytes'] / 1e6:.2f} MB text -> {s['bin_bytes'] / 1e6:.2f} MB, "
            f"{s['seconds']:.2f} s, {s['tokens_per_s']:,.0f} tokens/s, {s['mb_per_s']:.2f} MB/s")


def run(args) -> int:
    """The command: ``args`` as apt/cli.py's ``add_preprocess_arguments`` defines them."""
    summary = preprocess(args.inputs, args.output, tokenizer=args.tokenizer,
                         tokenizer_path=args.tokenizer_path, fmt=args.fmt, field=args.field,
                         workers=args.workers, append_eod=args.append_eod,
                         train_bpe_vocab=args.train_bpe, progress=not args.quiet)
    print(format_summary(summary))
    return 0
