"""Preference pairs (apt/trainops/data/datasets/preference.py) and the synthetic arithmetic set:
separate tokenisation of prompt and answers, loss masks, truncation, the chat form, bad records, the
reference log-probs a batch carries, and the built-in ``synthetic:arith`` pairs."""
import json
import logging

import numpy as np
import pytest
import torch

from apt.core.config import ConfigError, load_profile
from apt.trainops.data import (ByteTokenizer, DataError, PreferenceDataset, SFTDataset,
                               create_dataloader, train_bpe)
from apt.trainops.data.datasets.batches import PreferenceBatch
from apt.trainops.data.build import build_datasets, heldout_chats
from apt.trainops.data.tokenizers.chat_template import ChatTemplate
from apt.trainops.data.sources.synthetic_arith import generate, near_miss
from apt.trainops.data.sources.synthetic_chat import materialise

PAIRS = [{"prompt": "hi", "chosen": "hello!", "rejected": "go away"},
         {"messages": [{"role": "system", "content": "be brief"},
                       {"role": "user", "content": "capital of France?"}],
          "chosen": {"role": "assistant", "content": "Paris"}, "rejected": "Lyon, I think"},
         {"prompt": "2+2=", "chosen": "4", "rejected": ""}]


def _conversation(record, side):
    messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
    answer = record[side]
    return {"messages": messages + [{"role": "assistant", "content":
                                     answer["content"] if isinstance(answer, dict) else answer}]}


def _answers(half, tok):
    return [tok.decode(half.labels[r][half.loss_mask[r] > 0].tolist())
            for r in range(half.rows)]


def test_rows_are_what_sft_trains_for_a_final_assistant_turn():
    tok = ByteTokenizer()
    ds = PreferenceDataset(PAIRS, tok, seq_length=96)
    batch = ds.get_batch(range(len(PAIRS)))
    assert isinstance(batch, PreferenceBatch) and batch.model_shape == (6, 96)
    assert batch.chosen.position_ids is None and batch.chosen.attention_mask is None
    for s, side in enumerate(("chosen", "rejected")):
        sft = SFTDataset([_conversation(r, side) for r in PAIRS], tok, seq_length=96)
        expected = sft.get_batch(range(len(PAIRS)))
        half = getattr(batch, side)
        # Same tokens, labels and loss mask as SFT's rendering of prompt + answer.
        for key in ("tokens", "labels", "loss_mask"):
            assert torch.equal(half[key], expected[key]), (side, key)
    assert _answers(batch.chosen, tok) == ["hello!\n", "Paris\n", "4\n"]
    assert _answers(batch.rejected, tok) == ["go away\n", "Lyon, I think\n", "\n"]
    # The end-of-document token is trained, nothing of the shared prompt is.
    ends = batch.chosen.labels[batch.chosen.loss_mask > 0]
    assert (ends == tok.eod_id).sum() == len(PAIRS)
    assert torch.equal(batch.chosen.tokens[0, :26], batch.rejected.tokens[0, :26])
    assert tok.decode(batch.chosen.tokens[1, :70].tolist()).startswith(
        "<|system|>\nbe brief\n<|user|>\ncapital of France?\n<|assistant|>\nParis")


def test_prompt_and_answer_never_merge_into_one_token(tmp_path):
    # A template whose generation prompt ends in a space: jointly, byte-level BPE's
    # pre-tokenizer glues that space to the answer's first word (" Paris"), so the prompt's
    # tokens are no prefix of the joint tokens; separately they are, exactly.
    text = "user: capital of France?\nassistant: Paris\n"
    tok = train_bpe([text, "Paris Paris Paris is in France"] * 50, 300, tmp_path / "tok.json")
    template = ChatTemplate("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                            "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    record = {"prompt": "capital of France?", "chosen": "Paris", "rejected": "Rome"}
    prompt = tok.encode("user: capital of France?\nassistant: ").tolist()
    joint = tok.encode(text).tolist()
    assert joint[:len(prompt)] != prompt                     # the merge the dataset avoids
    ds = PreferenceDataset([record], tok, seq_length=48, template=template)
    row = ds.tokens[0, 0].tolist()
    answer = tok.encode("Paris\n").tolist() + [tok.eod_id]
    assert row[:len(prompt) + len(answer)] == prompt + answer
    assert ds.mask[0, 0].nonzero()[0].tolist() == list(range(len(prompt),
                                                             len(prompt) + len(answer)))


def test_truncation_keeps_the_prompt_end_and_drops_empty_answers(caplog):
    tok = ByteTokenizer()
    long_prompt = {"prompt": "x" * 40 + "END", "chosen": "yes", "rejected": "no"}
    long_answer = {"prompt": "q", "chosen": "a" * 60, "rejected": "b"}
    ds = PreferenceDataset([long_prompt, long_answer], tok, seq_length=39)   # rows of 40
    batch = ds.get_batch([0, 1])
    # Too long: the prompt keeps its last 20 tokens (half the row), the answers what fits.
    assert tok.decode(batch.chosen.tokens[0, :20].tolist()) == "xxEND\n<|assistant|>\n"
    assert tok.decode(batch.rejected.tokens[1, :20].tolist()) == "r|>\nq\n<|assistant|>\n"
    assert _answers(batch.chosen, tok) == ["yes\n", "a" * 20]
    assert _answers(batch.rejected, tok) == ["no\n", "b\n"]
    assert batch.chosen.loss_mask.sum(1).tolist() == [5, 20]       # "yes\n" + end of document
    assert ds.dropped == 0
    # Prompts kept whole (max_prompt_length >= the row) leave no room: dropped, counted, warned.
    with caplog.at_level(logging.WARNING, logger="apt.trainops.data.datasets.preference"):
        kept = PreferenceDataset([long_prompt, long_answer], tok, seq_length=39,
                                 max_prompt_length=64)
    assert kept.dropped == 1 and len(kept) == 1 and kept.record_index.tolist() == [1]
    assert "dropped 1 of 2" in caplog.text and "data.seq_length=39" in caplog.text
    assert _answers(kept.get_batch([0]).chosen, tok) == ["a" * 15]   # prompt whole: 25 tokens
    with pytest.raises(DataError, match="all 1 pairs have an answer cut off"):
        PreferenceDataset([long_prompt], tok, seq_length=39, max_prompt_length=64)


@pytest.mark.parametrize("line, problem", [
    ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "needs 'prompt' (or 'messages')"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "chosen": "a", "rejected": "b"}, "must end with a user turn"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "'chosen' must be a string"),
    ({"prompt": "p", "chosen": {"role": "user", "content": "a"}, "rejected": "b"},
     "'chosen' must be a string"),
])
def test_bad_records_name_the_file_and_line(tmp_path, line, problem):
    path = tmp_path / "pairs.jsonl"
    good = json.dumps(PAIRS[0])
    path.write_text("\n".join([good, good, json.dumps(line)] + [good] * 40) + "\n")
    cfg = load_profile("tiny", ["data.corpus=preference", "training.objective=dpo", f"data.path={path}"])
    with pytest.raises(DataError) as exc:
        build_datasets(cfg.data)
    message = str(exc.value)
    assert f"{path}:3" in message and problem in message and "\n" not in message


def test_preference_config_rules():
    for overrides, key in ((["data.corpus=preference", "training.objective=dpo"], "data.path"),
                           (["data.corpus=preference", "training.objective=dpo", "data.path=x.jsonl", "data.packing=true"],
                            "data.packing"),
                           (["data.corpus=stdlib", "data.path=synthetic:arith"], "data.path"),
                           (["data.corpus=sft", "data.path=x", "data.max_prompt_length=8"],
                            "data.max_prompt_length")):
        with pytest.raises(ConfigError) as exc:
            load_profile("tiny", overrides)
        assert exc.value.key == key, overrides
    cfg = load_profile("tiny", ["data.corpus=preference", "training.objective=dpo", "data.path=synthetic:qa"])
    with pytest.raises(DataError, match="synthetic:qa has no preference data"):
        build_datasets(cfg.data)


def test_reference_logps_round_trip_through_the_loader():
    tok = ByteTokenizer()
    records = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i)}
               for i in range(10)]
    ds = PreferenceDataset(records, tok, seq_length=32)
    assert ds.get_batch([0]).reference_logps is None
    logps = -np.random.default_rng(0).random((10, 2)) * 10
    ds.set_reference_logps(logps)
    seen = []
    loader = create_dataloader(ds, 4, data_parallel_rank=0, data_parallel_size=1,
                               infinite=False)
    for batch in loader:
        assert isinstance(batch, PreferenceBatch) and batch.reference_logps.dtype == torch.float64
        ids = batch.sample_id.numpy()
        np.testing.assert_array_equal(batch.reference_logps.numpy(), logps[ids])
        assert all(tok.decode(batch.chosen.tokens[r].tolist()).startswith(f"<|user|>\n{i}+1=")
                   for r, i in enumerate(ids))
        seen += ids.tolist()
    assert len(seen) == len(set(seen)) == 8            # two full micro-batches of four
    assert torch.equal(ds[3].reference_logps, torch.from_numpy(logps[3]))
    with pytest.raises(ValueError, match=r"expected \(10, 2\)"):
        ds.set_reference_logps(logps[:9])
    # The fingerprint keys a cache of them: stable, and it moves with the tokens or the length.
    again = PreferenceDataset(records, tok, seq_length=32)
    assert again.fingerprint() == ds.fingerprint()
    assert PreferenceDataset(records, tok, seq_length=33).fingerprint() != ds.fingerprint()
    records[4] = dict(records[4], rejected="9")
    assert PreferenceDataset(records, tok, seq_length=32).fingerprint() != ds.fingerprint()


def test_synthetic_arith_is_deterministic_heldout_and_near(tmp_path):
    small = dict(train_chats=3000, train_pairs=3000, heldout=300)
    files = generate(7, **small)
    assert files == generate(7, **small) and files != generate(8, **small)
    heldout = {c["messages"][0]["content"] for c in files["heldout"]}
    assert len(heldout) == 300
    assert [p["prompt"] for p in files["pairs-heldout"]] == \
        [c["messages"][0]["content"] for c in files["heldout"]]
    assert not heldout & {c["messages"][0]["content"] for c in files["train"]}
    assert not heldout & {p["prompt"] for p in files["pairs-train"]}
    for p in files["pairs-train"] + files["pairs-heldout"]:
        a, b = map(int, p["prompt"].rstrip("=").split("+"))
        assert p["chosen"] == str(a + b) and p["rejected"] != p["chosen"]
        assert p["rejected"].isdigit() and str(int(p["rejected"])) == p["rejected"]
    rng = __import__("random").Random(0)
    assert all(near_miss(n, rng) != n for n in list(range(200)) * 20)
    # Materialised once, byte-identical for one seed; the scorer asks the held-out questions.
    first = materialise("synthetic:arith:3", str(tmp_path / "a"), "preference")
    second = materialise("synthetic:arith:3", str(tmp_path / "b"), "preference")
    assert [f.read_bytes() for f in first] == [f.read_bytes() for f in second]
    cfg = load_profile("tiny", ["data.corpus=preference", "training.objective=dpo", "data.path=synthetic:arith:3",
                                f"data.cache_dir={tmp_path / 'a'}", "data.seq_length=40"])
    train, val, tok = build_datasets(cfg.data)
    assert len(val) == 500 and train.dropped == 0 and val.dropped == 0
    chats = heldout_chats(cfg.data)
    pairs = [json.loads(line) for line in first[1].read_text().splitlines()]
    assert [c["messages"][-1]["content"] for c in chats] == [p["chosen"] for p in pairs]
    sft = load_profile("tiny", ["data.corpus=sft", "data.path=synthetic:arith:3",
                                f"data.cache_dir={tmp_path / 'a'}", "data.seq_length=40"])
    assert heldout_chats(sft.data) == chats
