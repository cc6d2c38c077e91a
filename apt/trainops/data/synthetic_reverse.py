"""Word reversal made offline from a seed: the second checkable task of the GRPO demos (not
arithmetic, so a default tuned on sums is tested on something else).

``data.path: synthetic:reverse`` (or ``synthetic:reverse:SEED``) is read as SFT chats
(``data.corpus: sft``: the user asks ``"reverse plant"``, the assistant answers ``"tnalp"``)
and as prompts (``data.corpus: prompts``: the chat's last answer is the record's ``answer``).
The words are 3 to 6 random lowercase letters: nothing to recall, the model must learn to read
the letters back to front. The held-out words never occur in training (the 500 held-out chats
measure what generalises). The same seed gives byte-identical files.

The answer is the whole completion: a profile scores it with ``exact_match`` and the pattern
``ANSWER_PATTERN`` (the completion stripped of surrounding whitespace), which does not depend
on the reward's default answer extraction (written for numbers and answer markers).
"""
from __future__ import annotations

import random
import string

TRAIN_CHATS, HELDOUT = 20000, 500
VERSION = 1  # part of the file names: a change to the generator must not reuse old files
# The whole completion, stripped (one match; exact_match's ``pattern`` option).
ANSWER_PATTERN = r"(?s)\A\s*(.*?)\s*\Z"


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))


def chat(word: str) -> dict:
    return {"messages": [{"role": "user", "content": f"reverse {word}"},
                         {"role": "assistant", "content": word[::-1]}], "task": "reverse"}


def generate(seed: int = 0, train_chats: int = TRAIN_CHATS,
             heldout: int = HELDOUT) -> dict[str, list[dict]]:
    """``{"train", "heldout"}`` chats (file stems); no held-out word occurs in training."""
    rng = random.Random(f"apt-synthetic-reverse-{seed}")
    held: dict[str, None] = {}   # ordered set
    while len(held) < heldout:
        held.setdefault(_word(rng))
    train = []
    while len(train) < train_chats:
        word = _word(rng)
        if word not in held:
            train.append(word)
    return {"train": [chat(w) for w in train], "heldout": [chat(w) for w in held]}
