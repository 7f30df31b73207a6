"""Error types shared by the whole package.

Every error a user can cause by handing us bad input is a :class:`DataError` (or a
:class:`ConfigError`) whose message names the offending file or field and what is wrong,
so the CLI can print it without a traceback.
"""

from __future__ import annotations

import re
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


class OutputError(DataError):
    """An output that cannot be written (disk full, over quota, read-only, I/O error): names the path and errno.

    Not the fault of an input: a job stops on it instead of recording the image as failed."""


class ConfigError(DearliError):
    """Bad configuration: unknown key, wrong type or impossible value."""


def checkpoint_error(path: str | Path, expected: str, err: BaseException) -> DataError:
    """A weights file that could not be loaded as ``expected`` (e.g. "open_clip convnext_base_w_320"), as one
    line naming the file, the model it should hold and what differed (counts of missing, unexpected and
    reshaped weights from torch's ``load_state_dict`` message, or the reader's first line)."""
    text = str(err)
    sections = {"missing": r"Missing key\(s\) in state_dict: (.*)",
                "unexpected": r"Unexpected key\(s\) in state_dict: (.*)"}
    found = {name: re.findall(r'"([^"]+)"', (re.search(pattern, text) or [None, ""])[1])
             for name, pattern in sections.items()}
    reshaped = re.findall(r"size mismatch for ([^:]+):", text)
    if found["missing"] or found["unexpected"] or reshaped:
        parts = [f"{len(v)} {k} (e.g. {v[0]})" for k, v in found.items() if v]
        parts += [f"{len(reshaped)} of another shape (e.g. {reshaped[0]})"] if reshaped else []
        detail = "weights " + ", ".join(parts)
    else:
        first = next((line.strip() for line in text.splitlines() if line.strip()), "")
        detail = f"torch cannot read the file ({type(err).__name__}: {first[:100]})"
    return DataError(path, f"not the weights of {expected}: {detail}")
