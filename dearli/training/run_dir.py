"""A training run's directory: ``config.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``eval/``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dearli.config import Config, save_config
from dearli.errors import DataError

METRICS_FILE = "metrics.jsonl"


def prepare_run_dir(run_dir: str | Path, cfg: Config, resume: bool) -> Path:
    """Create the run directory and save the config in it; a directory already used needs ``resume``."""
    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        raise DataError(run_dir, "run directory is not empty; pass --resume to continue it or choose a new --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    return run_dir


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """One JSON line appended to the run's ``metrics.jsonl``."""
    with open(run_dir / METRICS_FILE, "a") as fh:
        fh.write(json.dumps(record) + "\n")
