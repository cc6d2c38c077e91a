"""What a profile says about rewards (``training.grpo.rewards``), checked without running any.

A list of mappings ``{name: str, weight: float = 1.0, **options}``: ``name`` is a built-in
reward (builtin.py) or a user function ``module:function``; the other keys are that reward's
options (keyword arguments). Standard library only, so config validation can call it.
"""
from __future__ import annotations

import difflib
import inspect
import math
import re
from dataclasses import dataclass, field

from apt.core.config.errors import ConfigError

from .builtin import BUILTIN_REWARDS

DEFAULT_KEY = "training.grpo.rewards"
_USER_FUNCTION = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


@dataclass(frozen=True)
class RewardSpec:
    name: str
    weight: float = 1.0
    options: dict = field(default_factory=dict)

    @property
    def is_builtin(self) -> bool:
        return self.name in BUILTIN_REWARDS


def check_reward_specs(specs, where: str | None = None,
                       key: str = DEFAULT_KEY) -> list[RewardSpec]:
    """Plain dicts (from YAML) -> RewardSpecs, or ConfigError naming ``where`` (the file) and
    ``key[i].field``. Built-in rewards are built once here, so a bad option (an unknown one, a
    regular expression that does not compile) is refused now; user functions are only checked
    for their ``module:function`` form here (RewardSet.from_specs imports them)."""
    if not isinstance(specs, (list, tuple)) or not specs:
        raise ConfigError(f"expected a non-empty list of {{name, weight, options...}} mappings, "
                          f"got {specs!r}", source=where, key=key)
    parsed = []
    for index, entry in enumerate(specs):
        at = f"{key}[{index}]"
        if isinstance(entry, str):  # shorthand: just the name
            entry = {"name": entry}
        if not isinstance(entry, dict):
            raise ConfigError(f"expected a mapping with a 'name', got {entry!r}", source=where,
                              key=at)
        options = dict(entry)
        name, weight = options.pop("name", None), options.pop("weight", 1.0)
        if isinstance(weight, str):  # YAML 1.1 reads "1e-2" (no dot) as a string
            try:
                weight = float(weight)
            except ValueError:
                pass
        if not isinstance(name, str) or not name:
            raise ConfigError(f"expected a reward name (one of {', '.join(BUILTIN_REWARDS)}, or "
                              f"'module:function'), got {name!r}", source=where, key=f"{at}.name")
        if (isinstance(weight, bool) or not isinstance(weight, (int, float))
                or not math.isfinite(weight)):
            raise ConfigError(f"expected a finite number, got {weight!r}", source=where,
                              key=f"{at}.weight")
        spec = RewardSpec(name, float(weight), options)
        if spec.is_builtin:
            build_builtin(spec, where, at)
        elif not _USER_FUNCTION.fullmatch(name):
            close = difflib.get_close_matches(name, list(BUILTIN_REWARDS), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"unknown reward {name!r}; {hint}built-in: "
                              f"{', '.join(BUILTIN_REWARDS)}, or a user function as "
                              f"'module:function'", source=where, key=f"{at}.name")
        parsed.append(spec)
    return parsed


def build_builtin(spec: RewardSpec, where: str | None, at: str):
    cls = BUILTIN_REWARDS[spec.name]
    known = [p for p in inspect.signature(cls).parameters]
    for option in spec.options:
        if option not in known:
            close = difflib.get_close_matches(str(option), known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"options: {', '.join(known)}"
            raise ConfigError(f"{spec.name} has no option {option!r}; {hint}", source=where,
                              key=f"{at}.{option}")
    try:
        return cls(**spec.options)
    except TypeError as exc:  # a required option missing, or one of the wrong type
        message = re.sub(r"^\w+\.?__init__\(\) ", "", str(exc))
        raise ConfigError(f"{spec.name}: {message.replace('positional argument', 'option')}",
                          source=where, key=at) from None
    except ValueError as exc:
        raise ConfigError(f"{spec.name}: {exc}", source=where, key=at) from None
