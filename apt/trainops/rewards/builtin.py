"""The built-in rewards, by the name a profile gives them.

Each is a class built from the spec's options (keyword arguments; a wrong one is a ValueError
or TypeError that ``check_reward_specs`` turns into one config line) and called like a user
function: ``reward(prompt, completion, record) -> float``. ``fields`` names the record fields
it reads, so a prompt file without them is refused before training.
"""
from __future__ import annotations

import logging
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor

from .answers import final_answer, normalize, parse_number
from .sandbox import SandboxLimits, run_python

log = logging.getLogger("apt.rewards")


def _pattern(pattern: str | None, flags: int = 0) -> re.Pattern | None:
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a string, got {pattern!r}")
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise ValueError(f"pattern {pattern!r} is not a regular expression ({exc})") from None


class ExactMatch:
    """1.0 when the completion's final answer equals ``record[field]`` after normalisation
    (answers.normalize: whitespace, a trailing full stop, number formatting, case), else 0.0.
    Without a ``pattern`` or marker the answer is the last number when ``record[field]`` is a
    number, else the whole completion stripped: "tnalp" answers "tnalp", where the last-number
    rule alone would score every textual answer 0 without a sign."""

    def __init__(self, pattern: str | None = None, field: str = "answer",
                 case_sensitive: bool = False):
        self.pattern, self.case_sensitive = _pattern(pattern), bool(case_sensitive)
        self.fields = (field,)

    def __call__(self, prompt: str, completion: str, record: dict) -> float:
        target = record[self.fields[0]]
        numeric = isinstance(target, (int, float)) or parse_number(str(target)) is not None
        answer = final_answer(completion, self.pattern, numeric=numeric)
        if answer is None:
            return 0.0
        same = normalize(answer, self.case_sensitive) == normalize(target, self.case_sensitive)
        return float(same)


class Numeric:
    """1.0 when the completion's final answer is a number within ``abs_tol`` or ``rel_tol``
    of ``record[field]`` (math.isclose), else 0.0 (also when it is no number)."""

    def __init__(self, pattern: str | None = None, field: str = "answer", abs_tol: float = 1e-6,
                 rel_tol: float = 0.0):
        if not (isinstance(abs_tol, (int, float)) and isinstance(rel_tol, (int, float))
                and abs_tol >= 0 and rel_tol >= 0):
            raise ValueError(f"abs_tol and rel_tol must be numbers >= 0, got {abs_tol!r}, "
                             f"{rel_tol!r}")
        self.pattern, self.abs_tol, self.rel_tol = _pattern(pattern), float(abs_tol), float(rel_tol)
        self.fields = (field,)

    def __call__(self, prompt: str, completion: str, record: dict) -> float:
        target = record[self.fields[0]]
        expected = float(target) if isinstance(target, (int, float)) else parse_number(str(target))
        if expected is None:
            raise ValueError(f"record field {self.fields[0]!r} is not a number: {target!r}")
        answer = final_answer(completion, self.pattern)
        value = parse_number(answer) if answer is not None else None
        if value is None:
            return 0.0
        return float(math.isclose(value, expected, rel_tol=self.rel_tol, abs_tol=self.abs_tol))


class Format:
    """1.0 when the completion matches the regular expression ``pattern``, else 0.0.
    ``mode``: fullmatch (the whole completion, default) or search (anywhere). ``.`` matches
    newlines too unless ``dotall`` is false."""

    def __init__(self, pattern: str, mode: str = "fullmatch", dotall: bool = True):
        if mode not in ("fullmatch", "search"):
            raise ValueError(f"mode must be fullmatch or search, got {mode!r}")
        self.regex = _pattern(pattern, re.DOTALL if dotall else 0)
        self.match = getattr(self.regex, mode)
        self.fields = ()

    def __call__(self, prompt: str, completion: str, record: dict) -> float:
        return float(self.match(completion) is not None)


_FENCED = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


class Code:
    """Runs the completion's Python code, then each of ``record[field]`` (a list of test
    statements such as ``"assert add(2, 3) == 5"``, or one string), in the sandbox
    (sandbox.py). Reward: the fraction of tests that pass (``mode: fraction``, default: a
    partly right program still ranks above a wrong one within its group), or 1.0 only when all
    pass (``mode: all``). A timeout, memory or process limit keeps the tests passed before it.
    The code is the last fenced block (```` ```python ````) when there is one, else the whole
    completion (``extract: all`` always takes the whole completion)."""

    def __init__(self, field: str = "tests", mode: str = "fraction", extract: str = "fenced",
                 timeout_s: float = 10.0, memory_mb: int = 512, max_processes: int = 16,
                 file_size_mb: int = 16, workers: int | None = None):
        if mode not in ("fraction", "all"):
            raise ValueError(f"mode must be fraction or all, got {mode!r}")
        if extract not in ("fenced", "all"):
            raise ValueError(f"extract must be fenced or all, got {extract!r}")
        numbers = dict(timeout_s=timeout_s, memory_mb=memory_mb, max_processes=max_processes,
                       file_size_mb=file_size_mb, workers=workers or 1)
        for key, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{key} must be a number > 0, got {value!r}")
        self.mode, self.extract = mode, extract
        self.limits = SandboxLimits(timeout_s=float(timeout_s), memory_mb=int(memory_mb),
                                    max_processes=int(max_processes),
                                    file_size_mb=int(file_size_mb))
        # Sandboxes are processes: threads only wait on them. Default: one per core, at most 4.
        self.workers = int(workers) if workers else min(4, os.cpu_count() or 1)
        self.fields = (field,)

    def code_of(self, completion: str) -> str:
        blocks = _FENCED.findall(completion) if self.extract == "fenced" else []
        return blocks[-1] if blocks else completion

    def tests_of(self, record: dict) -> list[str]:
        tests = record[self.fields[0]]
        if isinstance(tests, str):
            return [tests]
        if not isinstance(tests, (list, tuple)) or not all(isinstance(t, str) for t in tests):
            raise TypeError(f"record field {self.fields[0]!r} must be a string or a list of "
                            f"strings, got {type(tests).__name__}")
        return list(tests)

    def __call__(self, prompt: str, completion: str, record: dict) -> float:
        result = run_python(self.code_of(completion), self.tests_of(record), self.limits)
        if result.reason == "setup":  # our failure, not the program's: counted, never a 0
            raise RuntimeError(result.detail)
        _say_once_what_is_missing(result.layers)
        if self.mode == "all":
            return float(result.total > 0 and result.passed == result.total)
        return result.fraction

    def score_many(self, prompts, completions, records) -> list:
        """Like calling it on each sample, ``workers`` sandboxes at a time; a sample whose
        scoring raised gets its exception in place of a float."""
        def one(args):
            try:
                return self(*args)
            except Exception as exc:  # noqa: BLE001 - RewardSet counts and logs it
                return exc
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(one, zip(prompts, completions, records)))


_FULL_CAGE = ("netns", "mountns", "rlimits", "uid", "audit")
_said = set()


def _say_once_what_is_missing(layers) -> None:
    # Where the kernel refuses namespaces or we are not root, the sandbox is weaker than the
    # root guarantees in docs/trainers.md (sandbox.py): say so once per process, naming what is
    # missing.
    missing = tuple(layer for layer in _FULL_CAGE if layer not in layers)
    if missing and missing not in _said:
        _said.add(missing)
        log.warning("code sandbox runs without %s (see docs/trainers.md, the code sandbox)%s",
                    ", ".join(missing), "; as root without a uid of its own the process limit "
                    "does not apply" if "uid" in missing and os.geteuid() == 0 else "")


BUILTIN_REWARDS = {"exact_match": ExactMatch, "numeric": Numeric, "format": Format, "code": Code}
