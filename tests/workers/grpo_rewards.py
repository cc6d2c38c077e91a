"""User reward functions for the GRPO tests (``module:function`` in training.grpo.rewards)."""


def byte_mean(prompt: str, completion: str, record: dict) -> float:
    """A reward in [0, 1] that varies between any two completions: their mean character code
    / 256 (characters past 255, e.g. the replacement character of a broken byte, count 256)."""
    return sum(min(ord(c), 256) for c in completion) / (256.0 * max(len(completion), 1))


def raises_on_ascii(prompt: str, completion: str, record: dict) -> float:
    """Raises when the completion holds an ASCII character (a reward function with a bug)."""
    if any(ord(c) < 128 for c in completion):
        raise ValueError("ASCII is not handled")
    return 1.0


def first_byte_even(prompt: str, completion: str, record: dict) -> float:
    """1 when the completion's first character code is even, else 0 (also when it is empty):
    a 0/1 reward whose groups of 4 are sometimes all alike (dynamic sampling's case)."""
    return float(bool(completion) and ord(completion[0]) % 2 == 0)
