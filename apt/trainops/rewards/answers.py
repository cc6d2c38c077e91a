"""A completion's final answer: where to find it and how to compare it.

Without a pattern the answer is, in this order: what follows the last ``#### `` marker (GSM8K's
format), what follows the last ``answer:`` / ``answer =`` (case-insensitive, to the end of its
line), the last ``\\boxed{...}``, else the last number anywhere in the text, or, when the caller
expects no number (``numeric=False``: exact_match against a textual answer such as ``"plant"``),
the whole text stripped, so a bare correct answer is never scored 0 for lack of a marker. A
pattern is a regular expression: its last match is the answer, its first group when it has one.
"""
from __future__ import annotations

import math
import re

NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
_MARKERS = (re.compile(r"####\s*(.+?)\s*$", re.MULTILINE),
            re.compile(r"\banswer\s*(?:is\s*)?[:=]\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE),
            re.compile(r"\\boxed\{([^{}]*)\}"))


def final_answer(text: str, pattern: re.Pattern | None = None,
                 numeric: bool = True) -> str | None:
    """The final answer in ``text`` (see the module doc), or None when there is none."""
    if pattern is not None:
        return _last(pattern, text)
    for marker in _MARKERS:
        found = _last(marker, text)
        if found is not None:
            return found
    if numeric:
        return _last(NUMBER, text)
    return text.strip() or None


def _last(pattern: re.Pattern, text: str) -> str | None:
    match = None
    for match in pattern.finditer(text):
        pass
    if match is None:
        return None
    return match.group(1) if pattern.groups else match.group(0)


def parse_number(text: str) -> float | None:
    """The number ``text`` is (thousands commas, a leading ``$``, a trailing ``.`` or ``%``
    allowed), else None. ``"1,234"`` -> 1234.0; ``"12 apples"`` -> None."""
    text = text.strip().removeprefix("$").rstrip(".%").strip()
    if not NUMBER.fullmatch(text):
        return None
    value = float(text.replace(",", ""))
    return value if math.isfinite(value) else None


def normalize(text: str, case_sensitive: bool = False) -> str:
    """Whitespace collapsed, a trailing full stop dropped, and a number written canonically
    (``"4.0"``, ``"+4"``, ``"4."`` and ``"$4"`` all read ``"4"``), so formatting alone never
    decides a match."""
    text = " ".join(str(text).split()).rstrip(".")
    number = parse_number(text)
    if number is not None:
        return repr(int(number)) if number.is_integer() and abs(number) < 2 ** 53 else repr(number)
    return text if case_sensitive else text.casefold()
