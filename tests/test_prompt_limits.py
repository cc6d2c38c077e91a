"""Issue 30, data in the open: a held-out file of one's own (``data.val_path``) for SFT,
preference and prompt corpora; GRPO's start line saying how many prompts exceed
``seq_length - max_new_tokens`` and what is cut; what ``extends:`` inherits and how to reset it."""
import json

import pytest

from apt.core.config import ConfigError, load_profile
from apt.trainops.data import ByteTokenizer
from apt.trainops.data.build import build_datasets
from apt.trainops.data.datasets.prompts import PromptDataset


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


CORPORA = {
    "sft": lambda i: {"prompt": f"q{i}", "response": f"a{i}"},
    "preference": lambda i: {"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"},
    "prompts": lambda i: {"prompt": f"q{i}", "answer": f"a{i}"},
}


@pytest.mark.parametrize("corpus", sorted(CORPORA))
def test_val_path_is_the_held_out_split_and_all_of_path_trains(tmp_path, corpus):
    make = CORPORA[corpus]
    train = _jsonl(tmp_path / "train.jsonl", [make(i) for i in range(40)])
    val = _jsonl(tmp_path / "val.jsonl", [make(100 + i) for i in range(7)])
    objective = {"sft": "lm", "preference": "dpo", "prompts": "grpo"}[corpus]
    common = [f"data.corpus={corpus}", f"data.path={train}", "data.seq_length=32",
              f"training.objective={objective}", "training.grpo.max_new_tokens=8"]
    cfg = load_profile("tiny", common + [f"data.val_path={val}"])
    train_set, val_set, _ = build_datasets(cfg.data)
    assert (len(train_set), len(val_set)) == (40, 7)
    # without it: the hash split holds some of train.jsonl out
    train_set, val_set, _ = build_datasets(load_profile("tiny", common).data)
    assert len(train_set) + len(val_set) == 40 and len(val_set) < 40


def test_val_path_refused_where_it_means_nothing():
    with pytest.raises(ConfigError, match=r"data\.val_path: names held-out JSONL records"):
        load_profile("tiny", ["data.val_path=v.jsonl"])             # corpus stdlib
    with pytest.raises(ConfigError, match=r"data\.val_path: 'synthetic:arith' brings its own"):
        load_profile("tiny", ["data.corpus=sft", "data.path=synthetic:arith",
                              "data.val_path=v.jsonl"])


def test_prompt_truncation_counts_what_each_prompt_loses():
    records = [{"prompt": "x" * n} for n in (3, 10, 30, 50)]
    data = PromptDataset(records, ByteTokenizer(), max_prompt_length=20)
    lengths = [len(p) for p in data.prompts]
    full = [len(ByteTokenizer().encode(data.texts[i])) for i in range(4)]
    assert lengths == [min(n, 20) for n in full]
    cut = [n - 20 for n in full if n > 20]
    assert data.tokens_cut == cut and data.truncated == len(cut) >= 2
    assert data.truncation() == (f"{len(cut)} of 4 cut from the front by {min(cut)}..{max(cut)} "
                                 f"tokens (mean {sum(cut) / len(cut):.1f})")
    assert PromptDataset(records[:1], ByteTokenizer(), 200).truncation() == "none of 1 longer"


def test_grpo_start_line_names_the_limit_and_the_cut_prompts(tmp_path):
    from apt.trainops.trainers import O1Trainer
    train = _jsonl(tmp_path / "p.jsonl", [{"prompt": "y" * n, "answer": "1"}
                                          for n in (2, 4, 40, 50, 3, 5, 6, 7)])
    val = _jsonl(tmp_path / "v.jsonl", [{"prompt": "z", "answer": "1"}] * 2)
    cfg = load_profile("tiny", [
        "model.hidden_size=32", "model.num_layers=1", "model.num_attention_heads=2",
        "model.max_seq_len=48", "data.corpus=prompts", f"data.path={train}",
        f"data.val_path={val}", "data.seq_length=48", "training.objective=grpo",
        "training.batch_size=8", "training.grpo.num_generations=4",
        "training.grpo.max_new_tokens=8", f"output.dir={tmp_path / 'runs'}"])
    lines = O1Trainer.from_config(cfg).start_lines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("prompts | at most data.seq_length 48 - training.grpo."
                               "max_new_tokens 8 = 40 tokens, longer ones keep their end: "
                               "training 2 of 8 cut from the front by ")
    assert lines[0].endswith("; held-out none of 2 longer")


def test_extends_inherits_every_key_and_null_resets_a_section(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("extends: arith-sft-base\ntraining:\n  log_interval: 7\n")
    inherited = load_profile(str(child)).training
    assert inherited.target.metric == "val_exact_match" and inherited.log_interval == 7
    child.write_text("extends: arith-sft-base\ntraining:\n  target: null\n")
    reset = load_profile(str(child)).training
    assert reset.target.metric is None and reset.eval_interval == 25   # the rest still inherited
