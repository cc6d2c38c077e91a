"""Indexed datasets: preprocessing round trip, Megatron interop, blending, splits, resume."""
import json

import numpy as np
import pytest
import torch

from apt.core.config import load_profile
from apt.trainops.data import (BlendedDataset, ByteTokenizer, FeistelPermutation,
                               GlobalBatchSampler, IndexedReader, IndexedWriter, TokenDataset,
                               create_dataloader, load_tokenizer, train_bpe)
from apt.trainops.data.build import build_datasets
from apt.trainops.data.sources.preprocess import preprocess

DOCS = ["def f(x):\n    return x + 1\n", "héllo wörld ✓ naïve café",
        "The quick brown fox jumps over the lazy dog.\n" * 3, "print('bye')\n"]


def _write_inputs(tmp_path):
    (tmp_path / "a.txt").write_text(DOCS[0])
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n"
                                              for i, d in enumerate(DOCS[1:3])))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": [DOCS[3]]}), tmp_path / "c.parquet")
    return [str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.parquet")]


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_preprocess_round_trip(tmp_path, tokenizer):
    inputs = _write_inputs(tmp_path)
    out = str(tmp_path / "out" / "corpus")
    summary = preprocess(inputs, out, train_bpe_vocab=300 if tokenizer == "bpe" else None,
                         progress=False)
    assert summary["documents"] == 4 and summary["tokens"] > 0
    reader = IndexedReader(out)
    tok = load_tokenizer(out + ".tokenizer")   # the tokenizer travels with the data
    assert reader.num_documents == 4
    for j, text in enumerate(DOCS):
        ids = reader.document(j)
        assert ids[-1] == tok.eod_id
        assert tok.decode(ids[:-1]) == text


def test_parallel_workers_write_identical_files(tmp_path):
    inputs = _write_inputs(tmp_path)
    preprocess(inputs, str(tmp_path / "one"), workers=1, progress=False)
    preprocess(inputs, str(tmp_path / "two"), workers=2, chunk_size=1, progress=False)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"one{ext}").read_bytes() == (tmp_path / f"two{ext}").read_bytes()


def test_megatron_reads_apt_and_apt_reads_megatron(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50000, rng.integers(1, 40)) for _ in range(25)]
    with IndexedWriter(tmp_path / "apt", np.uint16) as w:
        for d in docs:
            w.add_document(d)
    theirs = IndexedDataset(str(tmp_path / "apt"))
    assert len(theirs) == len(docs)
    assert all(np.array_equal(theirs[i], d) for i, d in enumerate(docs))
    builder = IndexedDatasetBuilder(str(tmp_path / "meg.bin"), dtype=np.int32)
    for d in docs:
        builder.add_document(torch.tensor(d), [len(d)])
    builder.finalize(str(tmp_path / "meg.idx"))
    ours = IndexedReader(tmp_path / "meg")
    assert ours.dtype == np.int32 and ours.num_documents == len(docs)
    assert all(np.array_equal(ours.document(i), d) for i, d in enumerate(docs))


def _indexed_file(tmp_path, name, n_docs=200, seed=0, vocab=258):
    rng = np.random.default_rng(seed)
    with IndexedWriter(tmp_path / name, np.uint16) as w:
        for _ in range(n_docs):
            w.add_document(np.append(rng.integers(0, 256, rng.integers(5, 60)), 256))
    return str(tmp_path / name)


def test_build_indexed_splits_and_blend(tmp_path):
    a, b = _indexed_file(tmp_path, "a"), _indexed_file(tmp_path, "b", 100, seed=1)
    cfg = load_profile("tiny", ["data.corpus=indexed", f"data.path={a}", "data.split=90,10,0",
                                "data.seq_length=16", "model.max_seq_len=16"]).data
    train, val, tok = build_datasets(cfg)
    reader = IndexedReader(a)
    cut = reader.document_offsets[180]
    assert len(train) == (cut - 1) // 16 and val.tokens[0] == reader.tokens[cut]
    cfg = load_profile("tiny", ["data.corpus=indexed", f"data.blend=[[0.7, {a}], [0.3, {b}]]",
                                "data.seq_length=16", "model.max_seq_len=16",
                                "data.reset_position_ids=true"]).data
    train, val, tok = build_datasets(cfg)
    assert isinstance(train, BlendedDataset)
    for n in (10, 100, len(train)):                        # every prefix follows the weights
        share = np.bincount(np.asarray(train.index[:n, 0]), minlength=2) / n
        assert share == pytest.approx([0.7, 0.3], abs=1.01 / n)
    batch = train.get_batch([0, 5, 17, 3])
    assert batch["tokens"].shape == (4, 16) and batch["sample_id"].tolist() == [0, 5, 17, 3]
    for i, sid in enumerate([0, 5, 17, 3]):
        single = train[sid]
        assert torch.equal(single["tokens"], batch["tokens"][i])
        assert torch.equal(single["position_ids"], batch["position_ids"][i])
    cached = list((tmp_path / ".apt_cache").glob("blend-train-*.npy"))
    assert cached and np.array_equal(np.load(cached[0]), train.index)   # built once, cached


def test_document_boundaries_reset_positions_and_attention():
    eod = ByteTokenizer.eod_id
    tokens = np.array([1, 2, eod, 3, 4, 5, eod, 6, 7], dtype=np.int32)
    ds = TokenDataset(tokens, 8, eod_id=eod, reset_position_ids=True, reset_attention_mask=True)
    item = ds[0]
    assert item["position_ids"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    mask = item["attention_mask"][0]                     # True = may not attend
    assert not mask[4, 3] and mask[4, 2] and mask[7, 6] and not mask[7, 7] and mask[0, 1]


def _rank_streams(dataset, dp, global_batch, batches, consumed=0, seed=7, permutation="auto"):
    """Sample ids each rank sees, ranks simulated in one process."""
    micro = global_batch // dp
    out = []
    for rank in range(dp):
        loader = create_dataloader(dataset, micro, shuffle=True, seed=seed,
                                   global_batch_size=global_batch, data_parallel_rank=rank,
                                   data_parallel_size=dp, consumed_samples=consumed,
                                   permutation=permutation)
        it = iter(loader)
        out.append([next(it)["sample_id"].tolist() for _ in range(batches)])
    return out


@pytest.mark.parametrize("permutation", ["full", "feistel"])
def test_resume_and_dp_independent_order_over_three_epochs(permutation):
    ds = TokenDataset(np.arange(24 * 16 + 1, dtype=np.int32) % 250, 16)   # 24 samples
    gb, batches = 8, 9                                     # 3 batches/epoch: 3 epochs
    for dp in (1, 2, 4):
        full = _rank_streams(ds, dp, gb, batches, permutation=permutation)
        for restart in (1, 4, 7):                          # resume at an arbitrary step
            resumed = _rank_streams(ds, dp, gb, batches - restart, consumed=restart * gb,
                                    permutation=permutation)
            assert [s[restart:] for s in full] == resumed
        order = [sid for step in range(batches) for rank in range(dp) for sid in full[rank][step]]
        if dp == 1:
            reference = order
            for e in range(3):
                assert sorted(order[e * 24:(e + 1) * 24]) == list(range(24))
            assert order[:24] != order[24:48]              # a new order every epoch
        assert order == reference                          # same global order for DP=1, 2, 4


def test_feistel_is_a_permutation_and_resume_is_constant_time():
    for n in (1, 7, 1000, 4097):
        assert sorted(FeistelPermutation(n, 3, 1)[np.arange(n)].tolist()) == list(range(n))
    sampler = GlobalBatchSampler(10**12, 1024, 1024, consumed_samples=10**11 // 1024 * 1024,
                                 permutation="feistel")
    first = next(iter(sampler))                            # no epoch-sized work at all
    assert len(set(first)) == 1024 and max(first) < 10**12


def test_bpe_tokenizer_trained_and_reloaded(tmp_path):
    tok = train_bpe(DOCS * 5, 280, tmp_path / "tok.json")
    tok.save(tmp_path / "run" / "tokenizer")
    again = load_tokenizer(tmp_path / "run" / "tokenizer")
    assert again.vocab_size == tok.vocab_size and again.eod_id == tok.eod_id
    assert again.decode(again.encode(DOCS[1])) == DOCS[1]


def test_sentencepiece_tokenizer(tmp_path):
    import sentencepiece as spm
    (tmp_path / "c.txt").write_text("\n".join(DOCS * 20))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "c.txt"),
                                   model_prefix=str(tmp_path / "sp"), vocab_size=80,
                                   model_type="bpe", minloglevel=2, hard_vocab_limit=False)
    summary = preprocess([str(tmp_path / "c.txt")], str(tmp_path / "sp_data"),
                         tokenizer="sentencepiece", tokenizer_path=str(tmp_path / "sp.model"),
                         progress=False)
    tok = load_tokenizer(str(tmp_path / "sp_data.tokenizer"))
    ids = IndexedReader(tmp_path / "sp_data").document(0)
    assert summary["tokenizer"] == "sentencepiece" and ids[-1] == tok.eod_id
    assert "quick brown fox" in tok.decode(ids)
