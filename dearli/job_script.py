"""What a script under ``jobs/`` does first, before anything imports the standard library's ``ssl``.

``jobs/ssl.py`` shares its name with the standard library's ``ssl``, and ``python jobs/<script>.py`` puts
``jobs/`` first on ``sys.path``: every later ``import ssl`` (urllib, requests, mlflow, ray) would import that
job file instead. Imports nothing itself.
"""

from __future__ import annotations

import os
import sys


def prepare_job_script(script: str) -> None:
    """Take the folder of ``script`` (a job's ``__file__``) off ``sys.path``, and make stdout line-buffered: a
    Ray job's output is a pipe, where it would otherwise arrive in blocks, late."""
    folder = os.path.dirname(os.path.abspath(script))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != folder]
    sys.stdout.reconfigure(line_buffering=True)
