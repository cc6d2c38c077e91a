"""The field helper every schema section uses: a default plus the value rules (``gt``, ``ge``,
``lt``, ``le``) that the one generic validator (``validate.py``) enforces and names on failure."""
from __future__ import annotations

from dataclasses import field


def rule(default, **constraints):
    """A dataclass field with value constraints the validator enforces."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=constraints)
    return field(default=default, metadata=constraints)
