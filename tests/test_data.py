"""Tokenizer, dataset and the global resumable sampler."""
import math

import numpy as np
import pytest

from apt.trainops.data import ByteTokenizer, GlobalBatchSampler, TokenDataset


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo ✓'\n"
    assert tok.decode(tok.encode(text)) == text


def test_samples_are_shifted_windows_with_eod():
    docs = [("a", "abc"), ("b", "defg")]
    ds = TokenDataset.from_documents(docs, ByteTokenizer(), seq_length=3)
    assert ds.tokens.tolist()[3] == ByteTokenizer.eod_id and len(ds) == 2
    sample = ds[1]
    assert sample["tokens"].tolist() == ds.tokens[3:6].tolist()
    assert sample["labels"].tolist() == ds.tokens[4:7].tolist()


def test_unigram_entropy_by_hand():
    ds = TokenDataset(np.array([0, 0, 1, 1, 2, 3, 4, 5], dtype=np.int32), seq_length=2)
    p = np.array([2, 2, 1, 1, 1, 1]) / 8
    assert ds.unigram_entropy() == pytest.approx(-(p * np.log(p)).sum())
    assert ds.unigram_entropy() < math.log(6)


def _global_order(dp, micro, batches, consumed=0):
    """Concatenate every rank's share of each global batch."""
    per_rank = [iter(GlobalBatchSampler(100, 8, micro, r, dp, seed=3,
                                        consumed_samples=consumed)) for r in range(dp)]
    order = []
    for _ in range(batches):
        for it in per_rank:
            for _ in range(8 // (micro * dp)):
                order += next(it)
    return order


def test_global_order_independent_of_dp_and_resumable():
    reference = _global_order(1, 8, 30)          # 30 global batches: crosses 2 epochs
    assert _global_order(2, 4, 30) == reference
    assert _global_order(4, 1, 30) == reference
    assert _global_order(2, 2, 20, consumed=80) == reference[80:]
    epoch0 = reference[:96]
    assert len(set(epoch0)) == 96                # no repeats inside an epoch


def test_sampler_refuses_inconsistent_batches():
    with pytest.raises(ValueError, match="not a multiple"):
        GlobalBatchSampler(100, 10, 4, dp_size=2)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        GlobalBatchSampler(5, 8, 8)
