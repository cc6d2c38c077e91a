"""``DataError``: a data problem a user can fix, reported in one line before training starts.

It is a ``ConfigError`` (so the launcher and ``apt`` print it as one line and exit with code 2)
whose ``source`` is the offending file rather than a profile."""
from __future__ import annotations

from apt.core.config import ConfigError


class DataError(ConfigError):
    def __init__(self, path, problem: str, *, key: str | None = None):
        self.path = str(path) if path is not None else None
        super().__init__(problem, source=self.path, key=key)
