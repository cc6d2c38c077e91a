"""Multiple-choice tasks scored by log-likelihood, as lm-evaluation-harness does.

A task file is JSON Lines, one question a line::

    {"context": "import os\\nos.path.", "choices": ["join", "jion"], "answer": 0}

Each choice is scored by the sum of the log-probabilities of its tokens given the context
(``acc``: the highest sum wins) and by that sum divided by the choice's length in bytes
(``acc_norm``, lm-eval's length normalisation). Choices usually start with the separator
(a space) they need.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

BUILTIN_TASKS = Path(__file__).with_name("tasks")


@dataclass(frozen=True)
class Question:
    context: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class MultipleChoiceTask:
    name: str
    questions: tuple[Question, ...]

    @classmethod
    def load(cls, path_or_name: str | Path) -> "MultipleChoiceTask":
        """A JSONL file, or the name of a task shipped in apt/trainops/eval/tasks/."""
        path = Path(path_or_name)
        if not path.exists():
            path = BUILTIN_TASKS / f"{path_or_name}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"multiple-choice task {path_or_name!r}: no such file, and "
                                    f"no built-in task of that name in {BUILTIN_TASKS}")
        questions = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            item = json.loads(line)
            choices = tuple(item["choices"])
            if not (0 <= item["answer"] < len(choices)):
                raise ValueError(f"{path}:{number}: answer {item['answer']} is not an index of "
                                 f"its {len(choices)} choices")
            questions.append(Question(item["context"], choices, int(item["answer"])))
        return cls(path.stem, tuple(questions))


def choice_rows(task: MultipleChoiceTask, tokenizer, question_ids, seq_length: int | None,
                max_seq_length: int):
    """One row per (question, choice): (inputs, labels, continuation mask), right-padded.

    The row length is the longest context+choice of the whole task (capped at
    ``max_seq_length``; longer ones lose their context's beginning), so every rank that
    scores a share of the questions builds tensors of the same shape."""
    encoded = [[(tokenizer.encode(q.context).tolist(), tokenizer.encode(c).tolist())
                for c in q.choices] for q in task.questions]
    longest = max(len(ctx) + len(cont) - 1 for question in encoded for ctx, cont in question)
    length = min(seq_length or longest, max_seq_length)
    rows = []
    for qi in question_ids:
        for ctx, cont in encoded[qi]:
            full = (ctx + cont)[-(length + 1):]
            n_cont = min(len(cont), length)
            pad = length + 1 - len(full)
            tokens = torch.tensor(full + [tokenizer.pad_id] * pad)
            mask = torch.zeros(length)
            mask[len(full) - 1 - n_cont:len(full) - 1] = 1.0
            rows.append((tokens[:-1], tokens[1:], mask))
    return rows, length
