"""Roman numerals made offline from a seed: the second checkable task of the GRPO demos, a
string transduction rather than arithmetic (a default tuned on sums is tested on something
else).

``data.path: synthetic:roman`` (or ``synthetic:roman:SEED``) is read as SFT chats
(``data.corpus: sft``: the user asks ``"roman 347"``, the assistant answers ``"CCCXLVII"``)
and as prompts (``data.corpus: prompts``: the chat's last answer is the record's ``answer``).
Numbers 1..999: each decimal digit maps to its own group of letters, so a held-out number is
new combination of groups seen in training. 300 held-out numbers are never asked in training.
The same seed gives byte-identical files.

Word reversal was the first choice of task and was measured first: the tiny model did not start
copying letters from the prompt within 550 SFT steps (held-out exact-match 0.000 throughout,
answer loss flat at 2.2 nats), as the README's sft-tiny demo reports for its copying tasks.

The answer is the whole completion: a profile scores it with ``exact_match`` and the pattern
``ANSWER_PATTERN`` (the completion stripped of surrounding whitespace), which does not depend
on the reward's default answer extraction (written for numbers and answer markers).
"""
from __future__ import annotations

import random

TRAIN_CHATS, HELDOUT = 20000, 300
VERSION = 1  # part of the file names: a change to the generator must not reuse old files
# The whole completion, stripped (one match; exact_match's ``pattern`` option).
ANSWER_PATTERN = r"(?s)\A\s*(.*?)\s*\Z"
_DIGITS = (("", "C", "CC", "CCC", "CD", "D", "DC", "DCC", "DCCC", "CM"),
           ("", "X", "XX", "XXX", "XL", "L", "LX", "LXX", "LXXX", "XC"),
           ("", "I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX"))


def roman(n: int) -> str:
    """``n`` (1..999) in Roman numerals: 347 -> CCCXLVII."""
    if not 0 < n < 1000:
        raise ValueError(f"{n} is outside 1..999")
    return "".join(groups[int(d)] for groups, d in zip(_DIGITS, f"{n:03d}"))


def chat(n: int) -> dict:
    return {"messages": [{"role": "user", "content": f"roman {n}"},
                         {"role": "assistant", "content": roman(n)}], "task": "roman"}


def generate(seed: int = 0, train_chats: int = TRAIN_CHATS,
             heldout: int = HELDOUT) -> dict[str, list[dict]]:
    """``{"train", "heldout"}`` chats (file stems); no held-out number is asked in training."""
    rng = random.Random(f"apt-synthetic-roman-{seed}")
    numbers = list(range(1, 1000))
    rng.shuffle(numbers)
    held, train = numbers[:heldout], numbers[heldout:]
    return {"train": [chat(rng.choice(train)) for _ in range(train_chats)],
            "heldout": [chat(n) for n in held]}
