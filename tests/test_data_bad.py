"""Bad data: each case is a one-line DataError/ConfigError naming the file (or key) and the
problem, raised while building datasets, before training starts.

``python -m tests.test_data_bad`` prints every case's message."""
import json
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest

from apt.core.config import ConfigError, load_profile
from apt.trainops.data import IndexedReader, IndexedWriter
from apt.trainops.data.build import build_datasets
from apt.trainops.data.sources.preprocess import preprocess


def _good(tmp: Path, name="good", vocab_max=255, docs=50):
    rng = np.random.default_rng(0)
    with IndexedWriter(tmp / name, np.uint16) as w:
        for _ in range(docs):
            w.add_document(np.append(rng.integers(0, vocab_max + 1, 30), 256))
    return tmp / name


def _build(tmp, *overrides, path=None):
    sets = ["data.corpus=indexed", "data.seq_length=16", "model.max_seq_len=16"]
    sets += [f"data.path={path}"] if path else []
    cfg = load_profile("tiny", sets + list(overrides))
    return build_datasets(cfg.data, model_vocab_size=cfg.model.vocab_size)


def missing_file(tmp):
    _build(tmp, path=tmp / "nowhere")


def missing_idx(tmp):
    p = _good(tmp)
    Path(f"{p}.idx").unlink()
    _build(tmp, path=p)


def truncated_bin(tmp):
    p = _good(tmp)
    data = Path(f"{p}.bin").read_bytes()
    Path(f"{p}.bin").write_bytes(data[:len(data) // 2])
    _build(tmp, path=p)


def idx_from_another_bin(tmp):
    p, q = _good(tmp, "a", docs=50), _good(tmp, "b", docs=40)
    Path(f"{p}.idx").write_bytes(Path(f"{q}.idx").read_bytes())
    _build(tmp, path=p)


def not_an_index(tmp):
    p = _good(tmp)
    Path(f"{p}.idx").write_text("hello, I am not an index file at all, really")
    _build(tmp, path=p)


def truncated_idx(tmp):
    p = _good(tmp)
    data = Path(f"{p}.idx").read_bytes()
    Path(f"{p}.idx").write_bytes(data[:60])
    _build(tmp, path=p)


def unknown_dtype(tmp):
    p = _good(tmp)
    data = bytearray(Path(f"{p}.idx").read_bytes())
    data[17] = 6                                   # float64 tokens
    Path(f"{p}.idx").write_bytes(bytes(data))
    _build(tmp, path=p)


def corrupt_pointers(tmp):
    p = _good(tmp)
    data = bytearray(Path(f"{p}.idx").read_bytes())
    seqs = struct.unpack("<Q", data[18:26])[0]
    at = 34 + 4 * seqs + 8 * 3                     # pointer of sequence 3
    data[at:at + 8] = struct.pack("<q", 7)
    Path(f"{p}.idx").write_bytes(bytes(data))
    _build(tmp, path=p)


def empty_dataset(tmp):
    with IndexedWriter(tmp / "empty", np.uint16):
        pass
    _build(tmp, path=tmp / "empty")


def too_small_for_one_sample(tmp):
    with IndexedWriter(tmp / "small", np.uint16) as w:
        w.add_document([1, 2, 3, 256])
    _build(tmp, path=tmp / "small")


def token_outside_vocab(tmp):
    p = _good(tmp, vocab_max=300)                  # byte tokenizer has 258 ids
    _build(tmp, path=p)


def negative_blend_weight(tmp):
    p = _good(tmp)
    _build(tmp, f"data.blend=[[0.7, {p}], [-0.3, {p}]]")


def zero_blend_weights(tmp):
    p = _good(tmp)
    _build(tmp, f"data.blend=[[0, {p}], [0, {p}]]")


def empty_validation_split(tmp):
    p = _good(tmp, docs=50)
    _build(tmp, "data.split=99.9,0.1,0", path=p)


def tokenizer_file_missing(tmp):
    p = _good(tmp)
    _build(tmp, "data.tokenizer=hf", f"data.tokenizer_path={tmp}/tokenizer.json", path=p)


def jsonl_record_without_field(tmp):
    (tmp / "x.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no"}))
    preprocess([str(tmp / "x.jsonl")], str(tmp / "out"), progress=False)


def parquet_without_column(tmp):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": ["a"]}), tmp / "x.parquet")
    preprocess([str(tmp / "x.parquet")], str(tmp / "out"), progress=False)


def empty_sft_file(tmp):
    (tmp / "chat.jsonl").write_text("\n")
    cfg = load_profile("tiny", ["data.corpus=sft", f"data.path={tmp}/chat.jsonl"])
    build_datasets(cfg.data)


def _preprocessed(tmp, name, **tokenizer):
    (tmp / "corpus").mkdir(exist_ok=True)
    for i in range(40):
        (tmp / "corpus" / f"{i}.txt").write_text(f"def f{i}(x):\n    return x * {i} + 1\n" * 3)
    preprocess([str(tmp / "corpus")], str(tmp / name), progress=False, **tokenizer)
    return tmp / name


def blend_of_two_tokenizers(tmp):
    """The Data section's blend: a BPE-tokenized file with a byte-tokenized one."""
    web = _preprocessed(tmp, "web", train_bpe_vocab=300)
    code = _preprocessed(tmp, "code")
    _build(tmp, "data.tokenizer=hf", f"data.tokenizer_path={web}.tokenizer/tokenizer.json",
           f"data.blend=[[0.7, {web}], [0.3, {code}]]")


def data_of_another_tokenizer(tmp):
    web = _preprocessed(tmp, "web", train_bpe_vocab=300)
    _build(tmp, path=web)   # the profile's byte tokenizer


CASES = [missing_file, missing_idx, truncated_bin, idx_from_another_bin, not_an_index,
         truncated_idx, unknown_dtype, corrupt_pointers, empty_dataset, too_small_for_one_sample,
         token_outside_vocab, negative_blend_weight, zero_blend_weights, empty_validation_split,
         tokenizer_file_missing, jsonl_record_without_field, parquet_without_column,
         empty_sft_file, blend_of_two_tokenizers, data_of_another_tokenizer]


def message_of(case) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            case(Path(tmp))
        except ConfigError as exc:                 # DataError is a ConfigError
            return str(exc).replace(tmp, "<tmp>")
    raise AssertionError(f"{case.__name__}: no error raised")


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_data_is_one_clear_line(case):
    message = message_of(case)
    assert "\n" not in message and ValueError in type(ConfigError("x")).__mro__
    assert "<tmp>" in message or "data." in message   # names the file, or the key


def test_tokenizer_mismatch_names_both():
    message = message_of(blend_of_two_tokenizers)
    assert "<tmp>/code" in message and "<tmp>/web" in message, message
    assert "byte tokenizer" in message and "hf tokenizer" in message, message
    assert "data.tokenizer" in message_of(data_of_another_tokenizer)


def test_one_tokenizer_blends_and_files_without_one_warn(caplog):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        a = _preprocessed(tmp, "a")
        legacy = _good(tmp, "legacy")   # written without a tokenizer record (as Megatron-LM)
        train, _, _ = _build(tmp, f"data.blend=[[0.5, {a}], [0.5, {legacy}]]")
        assert len(train) > 0
    assert any("legacy records no tokenizer" in r.getMessage() for r in caplog.records)


def test_good_file_reads():
    with tempfile.TemporaryDirectory() as tmp:
        assert IndexedReader(_good(Path(tmp))).num_documents == 50


if __name__ == "__main__":
    for case in CASES:
        print(f"{case.__name__:28s} {message_of(case)}")
