"""SFT (chat templates, prefix-rendered loss masks, packing, truncation, the synthetic chat
set), preference pairs, augmentations."""
import json

import numpy as np
import pytest
import torch

from apt.core.config import load_profile
from apt.trainops.data import (ByteTokenizer, DataError, DocumentShuffle, HFTokenizer,
                               PreferenceDataset, SFTDataset, SpanCorruption, TokenDataset,
                               create_dataloader, load_tokenizer, train_bpe)
from apt.trainops.data.datasets.batches import LMBatch
from apt.trainops.data.build import build_datasets
from apt.trainops.data.tokenizers.chat_template import (BUILTIN, ChatTemplate, encode_chat,
                                                        last_turn, resolve_chat_template)
from apt.trainops.data.sources.synthetic_chat import generate, materialise

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
        # The answer, the template's end of turn ("\n") and the end-of-document token only.
        assert text == answer + "\n" and ids[-1] == tok.eod_id
    prompt = tok.decode(ds[1]["tokens"].tolist())
    assert prompt.startswith("<|system|>\nbe brief\n<|user|>\ncapital of France?\n<|assistant|>")


def test_packing_keeps_records_apart():
    tok = ByteTokenizer()
    packed = SFTDataset(RECORDS * 4, tok, seq_length=96, packing=True)
    plain = SFTDataset(RECORDS * 4, tok, seq_length=96)
    assert len(packed) < len(plain)
    trained = [tok.decode(packed[i]["labels"][packed[i]["loss_mask"] > 0].tolist())
               for i in range(len(packed))]
    assert "".join(trained) == "4\nParis\ncba\n" * 4          # same targets, fewer samples
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
    ds = PreferenceDataset([{"prompt": "hi", "chosen": "hello!", "rejected": "go away"}], tok, 40)
    item = ds[0]   # one PreferenceBatch row (tests/test_data_preference.py tests the rest)
    chosen = item.chosen.labels[item.chosen.loss_mask > 0].tolist()
    rejected = item.rejected.labels[item.rejected.loss_mask > 0].tolist()
    assert tok.decode(chosen) == "hello!\n" and tok.decode(rejected) == "go away\n"
    assert torch.equal(item.chosen.tokens[:8], item.rejected.tokens[:8])  # shared prompt


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


# ---------------------------------------------------------------- chat templates
CHAT = [{"role": "system", "content": "be brief"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6 of course"}]

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _spans(mask):
    """[(start, end)] of the runs of 1 in a 0/1 vector."""
    edges = np.diff(np.concatenate([[0], mask, [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def test_builtin_template_masks_every_assistant_turn():
    tok = ByteTokenizer()
    tokens, mask = encode_chat(CHAT, ChatTemplate(BUILTIN), tok, "chat")
    text = tok.decode(tokens)
    assert text == ("<|system|>\nbe brief\n<|user|>\n2+2?\n<|assistant|>\n4\n<|user|>\n"
                    "and 3+3?\n<|assistant|>\n6 of course\n")
    spans = _spans(mask)
    # Both answers with their end of turn; the second run ends with the end-of-document token.
    assert [tok.decode(tokens[a:b]) for a, b in spans] == ["4\n", "6 of course\n"]
    assert spans[-1][1] == len(tokens) and tokens[-1] == tok.eod_id
    # A conversation that ends with the user trains no end-of-document token.
    _, mask = encode_chat(CHAT[:4], ChatTemplate(BUILTIN), tok, "chat")
    assert mask[-1] == 0 and mask.sum() == 2


@pytest.fixture(scope="module")
def chatml_tokenizer(tmp_path_factory):
    """A byte-level BPE trained here, with ChatML's special tokens and a Jinja chat template in
    tokenizer_config.json, as a Hugging Face tokenizer directory holds them."""
    from tokenizers import Tokenizer
    directory = tmp_path_factory.mktemp("chatml")
    texts = [m["content"] for m in CHAT] * 50 + ["user assistant system the of and"] * 50
    train_bpe(texts, 300, directory / "tokenizer.json")
    raw = Tokenizer.from_file(str(directory / "tokenizer.json"))
    raw.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    raw.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None,
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    return HFTokenizer(directory)


def test_tokenizer_template_is_used_and_masks_by_prefixes(chatml_tokenizer):
    tok = chatml_tokenizer
    template = resolve_chat_template(tok, "auto")
    assert template.source == CHATML
    tokens, mask = encode_chat(CHAT, template, tok, "chat")
    assert tokens[:-1].tolist() == tok.encode(template.render(CHAT)).tolist()
    im_end = tok._tok.token_to_id("<|im_end|>")
    expected = [tok.encode(text).tolist() for text in ("4<|im_end|>", "6 of course<|im_end|>")]
    spans = _spans(mask)
    # Each answer up to its end-of-turn marker, which the assistant learns to produce; the
    # template's newline after it and the end-of-document token are never generated.
    assert [tokens[a:b].tolist() for a, b in spans] == expected
    assert expected[0][-1] == im_end and tokens[-1] == tok.eod_id and mask[-1] == 0
    prompt, answer = last_turn(CHAT, template, tok, "chat")
    assert tok.decode(prompt).endswith("assistant\n")
    assert answer.tolist() == expected[1]
    assert resolve_chat_template(tok, "builtin").source == BUILTIN


def test_the_template_travels_with_a_saved_tokenizer(chatml_tokenizer, tmp_path):
    chatml_tokenizer.save(tmp_path / "tokenizer")
    restored = load_tokenizer(tmp_path / "tokenizer")
    assert resolve_chat_template(restored, "auto").source == CHATML
    assert resolve_chat_template(ByteTokenizer(), "auto").source == BUILTIN


def test_template_renders_as_transformers_does(chatml_tokenizer):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(chatml_tokenizer.path.parent))
    template = resolve_chat_template(chatml_tokenizer, "auto")
    for add in (False, True):
        assert template.render(CHAT[:4], add) == hf.apply_chat_template(
            CHAT[:4], tokenize=False, add_generation_prompt=add)


def test_a_template_that_is_not_prefix_stable_is_refused():
    tok = ByteTokenizer()
    # The generation prompt opens "<|assistant|>" but the assistant's message is rendered
    # under "<|bot|>": the prompt is not a prefix of the rendered turn.
    other_header = ChatTemplate(BUILTIN.replace("<|{{ message['role'] }}|>",
                                                "<|{{ 'bot' if message['role'] == 'assistant' "
                                                "else message['role'] }}|>"), "other-header")
    # Earlier answers are rewritten once the conversation goes on (as some reasoning
    # templates drop earlier thoughts): the turn is not a prefix of the whole conversation.
    rewrites = ChatTemplate(BUILTIN.replace("{{ message['content'] }}",
                                            "{{ message['content'] if loop.last or "
                                            "message['role'] != 'assistant' else '...' }}"),
                            "rewrites")
    # One-turn records pass the second template; the two-turn record 1 is refused.
    for template, record, shorter in ((other_header, 0, "messages before 1 with the generation "
                                                        "prompt"),
                                      (rewrites, 1, "messages up to 2")):
        with pytest.raises(DataError, match=rf"chat\[train\]: record {record}: chat template "
                                            rf"{template.name}: rendering {shorter} is not a "
                                            rf"token prefix"):
            SFTDataset([RECORDS[0], {"messages": CHAT}], tok, 96, template=template,
                       name="chat[train]")
        assert "\n" not in str(pytest.raises(DataError, encode_chat, CHAT, template, tok,
                                             "x").value)


# ---------------------------------------------------------------- packing and truncation
def test_packed_rows_hold_the_same_records_as_unpacked_ones():
    tok = ByteTokenizer()
    records = RECORDS * 3 + [{"messages": CHAT}]
    plain = SFTDataset(records, tok, seq_length=96)
    packed = SFTDataset(records, tok, seq_length=96, packing=True)
    assert isinstance(packed.get_batch([0]), LMBatch) and len(packed) < len(plain)
    assert plain.get_batch([0]).attention_mask is None
    seen = 0
    for r in range(len(packed)):
        row = packed.get_batch([r])
        positions, mask = row.position_ids[0], row.attention_mask[0, 0]
        starts = torch.nonzero(positions == 0).flatten().tolist()
        ends = starts[1:] + [None]
        for start, end in zip(starts, ends):
            if row.tokens[0, start] == tok.pad_id:
                break                                          # the padding after the records
            one = plain.get_batch([seen])
            n = int((one.tokens[0] != tok.pad_id).sum()) if end is None else end - start
            # Same inputs and trained labels; the last input (the end-of-document token) is
            # followed by the next record or padding, never trained.
            for field, m in (("tokens", n), ("loss_mask", n), ("labels", n - 1)):
                assert torch.equal(getattr(row, field)[0, start:start + m],
                                   getattr(one, field)[0, :m]), (r, start, field)
            last = start + n - 1
            assert row.tokens[0, last] == tok.eod_id and row.loss_mask[0, last] == 0
            # Positions restart; attention is causal inside the record, nothing outside it.
            assert positions[start:start + n].tolist() == list(range(n))
            block = ~mask[start:start + n, start:start + n]
            assert torch.equal(block, torch.ones(n, n, dtype=torch.bool).tril())
            assert mask[start:start + n, :start].all() and mask[start:start + n,
                                                                start + n:].all()
            seen += 1
    assert seen == len(records)


def test_loss_never_crosses_a_record_boundary():
    # A template with no header: a record may start with trained (assistant) tokens. Packed
    # after another record, the label of that record's last input is this first token: the
    # previous record must not be trained to predict it.
    tok, bare = ByteTokenizer(), ChatTemplate("{% for m in messages %}{{ m['content'] }}"
                                              "{% endfor %}", "bare")
    records = [{"messages": [{"role": "assistant", "content": text}]} for text in ("ab", "cd")]
    packed = SFTDataset(records, tok, seq_length=16, packing=True, template=bare).get_batch([0])
    assert tok.decode(packed.tokens[0, :6].tolist()) == "abcd"       # a, b, EOD, c, d, EOD
    assert packed.labels[0, 2] == ord("c") and packed.loss_mask[0, 2] == 0
    assert packed.loss_mask[0, :5].tolist() == [1, 1, 0, 1, 1]       # b, EOD | d, EOD


def test_truncation_drops_records_without_assistant_tokens(caplog):
    tok = ByteTokenizer()
    long_prompt = {"prompt": "x" * 200, "response": "y"}
    with caplog.at_level("WARNING"):
        ds = SFTDataset([long_prompt, RECORDS[0], long_prompt], tok, seq_length=64)
    assert ds.dropped == 2 and len(ds) == 1 and ds.num_records == 1
    assert "dropped 2 of 3 records" in caplog.text
    assert all(ds[i]["loss_mask"].sum() > 0 for i in range(len(ds)))   # no all-masked row
    # A long answer is cut, not dropped: some of it is still trained.
    cut = SFTDataset([{"prompt": "q", "response": "z" * 100}], tok, seq_length=32)
    assert cut.dropped == 0 and 0 < cut[0]["loss_mask"].sum() < 100
    with pytest.raises(DataError, match="all 1 records have their assistant tokens cut off"):
        SFTDataset([long_prompt], tok, seq_length=64, name="long")


# ---------------------------------------------------------------- the synthetic chat set
def test_synthetic_chats_are_deterministic_and_held_out(tmp_path):
    train, heldout = generate(seed=0, train_chats=3000, heldout_chats=100)
    assert (train, heldout) == generate(seed=0, train_chats=3000, heldout_chats=100)
    assert generate(seed=1, train_chats=3000, heldout_chats=100)[1] != heldout
    asked = {m["content"] for r in train for m in r["messages"] if m["role"] == "user"}
    assert not asked & {r["messages"][-2]["content"] for r in heldout}
    assert {r["task"] for r in heldout} == {"repeat", "upper", "next", "reverse", "add"}
    assert any(len(r["messages"]) == 4 for r in train)          # some two-turn chats
    for r in heldout[:20]:                                       # the answers are right
        question, answer = r["messages"][-2]["content"], r["messages"][-1]["content"]
        if r["task"] == "add":
            a, b = question.rstrip("=?").split("+")
            assert int(answer) == int(a) + int(b)
        elif r["task"] == "reverse":
            assert answer == question.split(": ")[1][::-1]
    first = [p.read_bytes() for p in materialise("synthetic:qa:3", str(tmp_path / "a"))]
    again = [p.read_bytes() for p in materialise("synthetic:qa:3", str(tmp_path / "b"))]
    assert first == again and first[0] and first[1]
    with pytest.raises(DataError, match="unknown built-in set"):
        materialise("synthetic:nope", str(tmp_path))


def test_synthetic_corpus_from_profile(tmp_path):
    cfg = load_profile("sft-tiny", [f"data.cache_dir={tmp_path}", "data.packing=false",
                                    "data.seq_length=64"])
    train, val, tok = build_datasets(cfg.data)
    assert len(val) == 500 and len(train) == 20000     # one record per row
    batch = train.get_batch([0, 1])
    assert batch.tokens.shape == (2, 64) and batch.loss_mask.sum() > 0
    packed, _, _ = build_datasets(load_profile("sft-tiny", [f"data.cache_dir={tmp_path}"]).data)
    assert len(packed) < len(train) / 2 and packed.get_batch([0]).attention_mask is not None
