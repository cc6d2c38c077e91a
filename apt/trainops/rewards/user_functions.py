"""User reward functions named ``module:function`` (the module imported by its dotted path).

Signature: ``fn(prompt: str, completion: str, record: dict, **options) -> float``, where
``record`` is the prompt file's record and ``options`` are the spec's extra keys. The module
must be importable by the training processes (installed, or on PYTHONPATH). A function may
declare the record fields it reads, ``fn.fields = ("answer",)``, so that a prompt file without
them is refused before training (RewardSet.check_records).
"""
from __future__ import annotations

import importlib
import inspect


class Unresolvable(Exception):
    """Why a ``module:function`` name does not give a usable reward function."""


def resolve(name: str, options: dict):
    module_name, _, attribute = name.partition(":")
    try:
        target = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's module's
        raise Unresolvable(f"{type(exc).__name__}: {exc}" if not isinstance(exc, ImportError)
                           else str(exc)) from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise Unresolvable(f"module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise Unresolvable(f"{attribute!r} is a {type(target).__name__}, not a function")
    try:
        inspect.signature(target).bind("prompt", "completion", {}, **options)
    except TypeError as exc:
        raise Unresolvable(f"cannot be called as fn(prompt, completion, record"
                           f"{', **options' if options else ''}): {exc}") from None
    except ValueError:  # no signature to read (some builtins): trust it
        pass
    return target
