"""Error types shared by the whole package.

Every error a user can cause by handing us bad input is a :class:`DataError` (or a
:class:`ConfigError`) whose message names the offending file or field and what is wrong,
so the CLI can print it without a traceback.
"""

from __future__ import annotations

from pathlib import Path


class DearliError(Exception):
    """Base class of the errors the CLI reports as a one-line message."""


class DataError(DearliError):
    """Bad input data: names the file (and, where known, the field or segment) at fault."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")

    def __reduce__(self):
        # Pickle by constructor arguments so errors raised in worker processes arrive intact.
        return (type(self), (self.path, self.problem))


class ConfigError(DearliError):
    """Bad configuration: unknown key, wrong type or impossible value."""
