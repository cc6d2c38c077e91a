"""Programmatic question/answer chats, made offline from a seed: the SFT demo's data.

``data.corpus: sft`` with ``data.path: synthetic:qa`` (or ``synthetic:qa:SEED``) trains on
them. Every task is one a ~1M-parameter byte-level model can visibly learn on a CPU in
minutes, from easy to harder: ``repeat`` (copy a word), ``upper`` (upper-case it), ``next``
(the number after N), ``reverse`` (a word backwards), ``add`` (two-digit sums). A tenth of the
chats have two question/answer turns (the loss covers both answers; the scorer asks the last).

The held-out questions never occur in the training chats, so held-out exact-match measures
what generalises, not what was memorised. The same seed gives byte-identical files.
"""
from __future__ import annotations

import json
import os
import random
import string
from pathlib import Path

from ..errors import DataError

PREFIX = "synthetic:"
TASKS = ("repeat", "upper", "next", "reverse", "add")
TRAIN_CHATS, HELDOUT_CHATS = 20000, 500
_VERSION = 1  # part of the file names: a change to the generator must not reuse old files
_TWO_TURN_FRACTION = 0.1


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))


def _question(task: str, rng: random.Random) -> tuple[str, str]:
    if task == "repeat":
        word = _word(rng)
        return f"Repeat: {word}", word
    if task == "upper":
        word = _word(rng)
        return f"Uppercase: {word}", word.upper()
    if task == "next":
        n = rng.randint(0, 999)
        return f"What comes after {n}?", str(n + 1)
    if task == "reverse":
        word = _word(rng)
        return f"Reverse: {word}", word[::-1]
    if task == "add":
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        return f"{a}+{b}=?", str(a + b)
    raise ValueError(f"unknown task {task!r}")


def _chat(rng: random.Random, turns: int, task: str | None = None) -> dict:
    messages, tasks = [], []
    for turn in range(turns):
        # The last turn's task is the record's task (what the scorer asks).
        name = task if task is not None and turn == turns - 1 else rng.choice(TASKS)
        question, answer = _question(name, rng)
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": answer}]
        tasks.append(name)
    return {"messages": messages, "task": tasks[-1]}


def generate(seed: int = 0, train_chats: int = TRAIN_CHATS,
             heldout_chats: int = HELDOUT_CHATS) -> tuple[list[dict], list[dict]]:
    """(train, held-out) chat records; held-out has the same number of chats per task and no
    question of it occurs anywhere in train."""
    rng = random.Random(f"apt-synthetic-qa-{seed}")
    heldout, asked = [], set()
    while len(heldout) < heldout_chats:
        record = _chat(rng, 2 if rng.random() < _TWO_TURN_FRACTION else 1,
                       task=TASKS[len(heldout) % len(TASKS)])
        last_question = record["messages"][-2]["content"]
        if last_question not in asked:
            asked.add(last_question)
            heldout.append(record)
    train = []
    while len(train) < train_chats:
        record = _chat(rng, 2 if rng.random() < _TWO_TURN_FRACTION else 1)
        if not any(m["content"] in asked for m in record["messages"] if m["role"] == "user"):
            train.append(record)
    return train, heldout


# Built-in sets: name -> what they offer (data.corpus values).
SETS = {"qa": ("sft",), "arith": ("sft", "preference", "prompts"),
        "roman": ("sft", "prompts")}


def parse_source(path: str) -> tuple[str, int]:
    """``synthetic:NAME`` or ``synthetic:NAME:SEED`` -> (name, seed)."""
    name, _, seed = path[len(PREFIX):].partition(":")
    if name not in SETS:
        known = ", ".join(f"synthetic:{n}" for n in SETS)
        raise DataError(path, f"unknown built-in set (known: {known}, each with an optional "
                              f":SEED)", key="data.path")
    try:
        return name, int(seed or 0)
    except ValueError:
        raise DataError(path, f"seed {seed!r} is not an integer", key="data.path") from None


def _generator(name: str):
    """(version, seed -> {file stem: records}) of a built-in set."""
    if name == "arith":
        from . import synthetic_arith
        return synthetic_arith.VERSION, synthetic_arith.generate
    if name == "roman":
        from . import synthetic_roman
        return synthetic_roman.VERSION, synthetic_roman.generate
    return _VERSION, lambda seed: dict(zip(("train", "heldout"), generate(seed)))


def materialise(path: str, cache_dir: str | None = None,
                corpus: str = "sft") -> tuple[Path, Path]:
    """Write (once) and return the train and held-out JSONL files of ``synthetic:...``:
    chats for ``corpus="sft"`` (and ``"prompts"``: a chat's last answer is the prompt's
    ``answer``), preference pairs for ``corpus="preference"``.
    Default directory: ``~/.cache/apt/synthetic``."""
    name, seed = parse_source(path)
    if corpus not in SETS[name]:
        offers = [f"synthetic:{n}" for n, kinds in SETS.items() if corpus in kinds]
        raise DataError(path, f"synthetic:{name} has no {corpus} data (data.corpus "
                              f"{corpus!r} reads {', '.join(offers) or 'no built-in set'})",
                        key="data.path")
    root = Path(cache_dir or Path.home() / ".cache" / "apt" / "synthetic")
    stems = ("pairs-train", "pairs-heldout") if corpus == "preference" else ("train", "heldout")
    version, generate_files = _generator(name)
    directory = root / f"{name}-v{version}-seed{seed}"
    files = tuple(directory / f"{stem}.jsonl" for stem in stems)
    if all(f.is_file() for f in files):
        return files
    directory.mkdir(parents=True, exist_ok=True)
    for stem, records in generate_files(seed).items():
        target = directory / f"{stem}.jsonl"
        temporary = target.with_name(f".{target.name}.{os.getpid()}")   # ranks may race
        temporary.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(temporary, target)
    return files
