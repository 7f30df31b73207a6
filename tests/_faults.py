"""Faults for tests: a writer killed between its temporary file and the rename that publishes it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest


class Killed(BaseException):
    """A kill between a temporary file and its rename: nothing after it runs, nothing is cleaned up."""


@contextlib.contextmanager
def killed_before_rename(name: str | None = None) -> Iterator[None]:
    """Inside the block, ``write_atomic``'s rename onto a file called ``name`` (any file when None) raises Killed."""
    import dearli.caches.store as store_module

    real = os.replace

    def replace(src, dst):
        if name is None or Path(dst).name == name:
            raise Killed
        real(src, dst)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store_module.os, "replace", replace)
        yield
