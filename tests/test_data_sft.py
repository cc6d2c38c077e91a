"""SFT (template, prompt loss mask, packing), preference pairs, augmentations."""
import json

import numpy as np
import torch

from apt.core.config import load_profile
from apt.trainops.data import (ByteTokenizer, DocumentShuffle, PreferenceDataset, SFTDataset,
                               SpanCorruption, TokenDataset, create_dataloader)
from apt.trainops.data.build import build_datasets

RECORDS = [{"prompt": "2+2?", "response": "4"},
           {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": "capital of France?"},
                         {"role": "assistant", "content": "Paris"}]},
           {"instruction": "reverse", "input": "abc", "output": "cba"}]


def _trained_text(ds, i, tok):
    item = ds[i]
    labels = item["labels"][item["loss_mask"] > 0]
    return tok.decode(labels.tolist()), labels.tolist()


def test_sft_masks_the_prompt():
    tok = ByteTokenizer()
    ds = SFTDataset(RECORDS, tok, seq_length=96)
    for i, answer in enumerate(["4", "Paris", "cba"]):
        text, ids = _trained_text(ds, i, tok)
        assert text == answer and ids[-1] == tok.eod_id     # response + end of document only
    prompt = tok.decode(ds[1]["tokens"].tolist())
    assert prompt.startswith("<|system|>\nbe brief\n<|user|>\ncapital of France?\n<|assistant|>")


def test_packing_keeps_records_apart():
    tok = ByteTokenizer()
    packed = SFTDataset(RECORDS * 4, tok, seq_length=96, packing=True)
    plain = SFTDataset(RECORDS * 4, tok, seq_length=96)
    assert len(packed) < len(plain)
    trained = [tok.decode(packed[i]["labels"][packed[i]["loss_mask"] > 0].tolist())
               for i in range(len(packed))]
    assert "".join(trained) == "4Pariscba" * 4                # same targets, fewer samples
    positions = packed[0]["position_ids"].tolist()
    assert positions[0] == 0 and positions.count(0) >= 2       # restarts for each record


def test_sft_corpus_from_profile(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS * 10))
    cfg = load_profile("tiny", ["data.corpus=sft", f"data.path={path}", "data.packing=true"])
    train, val, tok = build_datasets(cfg.data)
    batch = next(iter(create_dataloader(train, 2, data_parallel_rank=0, data_parallel_size=1)))
    assert batch["tokens"].shape == (2, 128) and batch["loss_mask"].sum() > 0


def test_preference_pairs():
    tok = ByteTokenizer()
    ds = PreferenceDataset([{"prompt": "hi", "chosen": "hello!", "rejected": "go away"}], tok, 32)
    item = ds[0]
    chosen = item["chosen_labels"][item["chosen_loss_mask"] > 0].tolist()
    rejected = item["rejected_labels"][item["rejected_loss_mask"] > 0].tolist()
    assert tok.decode(chosen) == "hello!" and tok.decode(rejected) == "go away"
    assert torch.equal(item["chosen_tokens"][:8], item["rejected_tokens"][:8])  # shared prompt


def test_augmentations_are_deterministic_per_sample():
    eod = ByteTokenizer.eod_id
    tokens = np.array([1, 2, eod, 3, 4, 5, eod, 6, 7, eod, 8, 9, eod] * 4, dtype=np.int32)
    shuffle = TokenDataset(tokens, 12, eod_id=eod, transforms=[DocumentShuffle(eod, seed=1)])
    plain = TokenDataset(tokens, 12)
    a, b = shuffle.get_batch([0, 1, 2]), shuffle.get_batch([0, 1, 2])
    assert torch.equal(a["tokens"], b["tokens"])
    for i in range(3):
        chunk = torch.cat([a["tokens"][i], a["labels"][i, -1:]])
        ref = torch.cat([plain[i]["tokens"], plain[i]["labels"][-1:]])
        assert sorted(chunk.tolist()) == sorted(ref.tolist())   # same tokens, new order
    assert not torch.equal(a["tokens"], plain.get_batch([0, 1, 2])["tokens"])
    corrupt = TokenDataset(tokens, 12, transforms=[SpanCorruption(999, rate=0.3, seed=1)])
    c = corrupt.get_batch([0, 1])
    assert (c["tokens"] == 999).any() and torch.equal(c["labels"], plain.get_batch([0, 1])["labels"])
