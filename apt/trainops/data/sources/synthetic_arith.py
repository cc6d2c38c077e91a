"""Integer addition made offline from a seed: the preference-alignment demo's checkable task.

``data.path: synthetic:arith`` (or ``synthetic:arith:SEED``) is read as SFT chats
(``data.corpus: sft``: the user asks ``"37+48="``, the assistant answers ``"85"``) and as
preference pairs (``data.corpus: preference``: the same question, ``chosen`` the correct sum,
``rejected`` a near miss: off by one, off by ten, or one digit changed; never the correct sum).

The operands are 0..99: a ~1M-parameter byte-level model goes from 0 to roughly half the
held-out sums in a minute or two of SFT on a CPU (profiles/arith-sft-tiny.yaml), so preference
training has room to show a gain. The held-out questions are never
asked in training (chats or pairs): held-out exact-match measures what generalises. The held-out
chats and the held-out pairs ask the same questions. The same seed gives byte-identical files.
"""
from __future__ import annotations

import random

TRAIN_CHATS, TRAIN_PAIRS, HELDOUT = 20000, 20000, 500
VERSION = 1  # part of the file names: a change to the generator must not reuse old files


def _operands(rng: random.Random) -> tuple[int, int]:
    return rng.randint(0, 99), rng.randint(0, 99)


def near_miss(answer: int, rng: random.Random) -> int:
    """A wrong sum a model plausibly produces: +-1, +-10, or one digit replaced (no leading
    zero, never negative, never ``answer`` itself)."""
    while True:
        kind = rng.choice(("one", "ten", "digit"))
        if kind == "one":
            wrong = answer + rng.choice((-1, 1))
        elif kind == "ten":
            wrong = answer + rng.choice((-10, 10))
        else:
            digits = list(str(answer))
            at = rng.randrange(len(digits))
            choices = [d for d in "0123456789" if d != digits[at] and
                       not (d == "0" and at == 0 and len(digits) > 1)]
            digits[at] = rng.choice(choices)
            wrong = int("".join(digits))
        if wrong >= 0 and wrong != answer:
            return wrong


def _question(a: int, b: int) -> str:
    return f"{a}+{b}="


def chat(a: int, b: int) -> dict:
    return {"messages": [{"role": "user", "content": _question(a, b)},
                         {"role": "assistant", "content": str(a + b)}], "task": "add"}


def pair(a: int, b: int, rng: random.Random) -> dict:
    return {"prompt": _question(a, b), "chosen": str(a + b),
            "rejected": str(near_miss(a + b, rng)), "task": "add"}


def generate(seed: int = 0, train_chats: int = TRAIN_CHATS, train_pairs: int = TRAIN_PAIRS,
             heldout: int = HELDOUT) -> dict[str, list[dict]]:
    """``{"train", "heldout"}`` chats and ``{"pairs-train", "pairs-heldout"}`` pairs (file stems).
    The held-out questions are distinct and never asked in training; the held-out pairs ask the
    held-out chats' questions. Train chats and train pairs draw from the same questions (a
    preference stage usually revisits the SFT prompts), independently."""
    rng = random.Random(f"apt-synthetic-arith-{seed}")
    held: dict[tuple[int, int], None] = {}   # ordered set
    while len(held) < heldout:
        held.setdefault(_operands(rng))

    def train_questions(count: int) -> list[tuple[int, int]]:
        out = []
        while len(out) < count:
            q = _operands(rng)
            if q not in held:
                out.append(q)
        return out

    chats, pairs = train_questions(train_chats), train_questions(train_pairs)
    return {"train": [chat(a, b) for a, b in chats],
            "heldout": [chat(a, b) for a, b in held],
            "pairs-train": [pair(a, b, rng) for a, b in pairs],
            "pairs-heldout": [pair(a, b, rng) for a, b in held]}
