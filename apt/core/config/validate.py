"""Turn a plain dict (merged YAML + overrides) into a typed, checked ``APTConfig``.

One generic walk over the dataclass schema: unknown keys (with a "did you mean"), wrong types and
values outside each field's rules are refused, naming the key and the file that set it.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing

from .errors import ConfigError
from .schema import KEY_ALIASES, APTConfig, cross_checks

_LOADER_FIELDS = {"sources", "config_hash"}


def build_config(data: dict, provenance: dict[str, str]) -> APTConfig:
    cfg = _build(APTConfig, data, "", provenance)
    for key, message in cross_checks(cfg):
        raise ConfigError(message, source=_source_of(key, provenance), key=key)
    return cfg


def _source_of(key: str, provenance: dict[str, str]) -> str | None:
    # The file (or --set) that last wrote this key, else the one that wrote its section.
    while key:
        if key in provenance:
            return provenance[key]
        key = key.rpartition(".")[0]
    return provenance.get("")


def _build(cls, data, prefix: str, provenance):
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of {cls.__name__} keys, got {_describe(data)}",
                          source=_source_of(prefix, provenance), key=prefix or None)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in _LOADER_FIELDS}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(_unknown_key_message(str(key), fields), key=dotted,
                              source=_source_of(dotted, provenance))
        values[key] = _coerce(hints[key], value, fields[key], dotted, provenance)
    return cls(**values)


def _unknown_key_message(key: str, fields) -> str:
    guess = KEY_ALIASES.get(key.lower())
    if guess not in fields:
        close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
        guess = close[0] if close else None
    hint = f"; did you mean '{guess}'?" if guess else f"; valid keys: {', '.join(sorted(fields))}"
    return f"unknown key{hint}"


def _coerce(hint, value, fld, key, provenance):
    source = _source_of(key, provenance)

    def fail(expected):
        raise ConfigError(f"expected {expected}, got {_describe(value)}", source=source, key=key)

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        hint, origin = options[0], typing.get_origin(options[0])
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, f"{key}.", provenance)
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint_text = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"must be one of {', '.join(map(str, choices))}, got {value!r}"
                              f"{hint_text}", source=source, key=key)
        return value
    if hint is bool:
        if not isinstance(value, bool):
            fail("true or false")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
    elif hint is float:
        # YAML 1.1 reads "3e-5" (no dot) as a string: accept numeric strings for floats.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                fail("a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            fail("a finite number")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            fail("a string")
    _check_rules(value, fld.metadata, key, source)
    return value


def _check_rules(value, rules, key, source):
    checks = {"gt": (lambda v, b: v > b, "> {}"), "ge": (lambda v, b: v >= b, ">= {}"),
              "lt": (lambda v, b: v < b, "< {}"), "le": (lambda v, b: v <= b, "<= {}")}
    for name, bound in rules.items():
        ok, text = checks[name]
        if not ok(value, bound):
            raise ConfigError(f"must be {text.format(bound)}, got {value!r}", source=source, key=key)


def _describe(value) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "null"
