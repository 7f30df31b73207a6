"""The pipeline's working directory: datasets, caches, runs and the local MLflow store, at stable paths.

A Ray job runs in a temporary copy of the submitted directory, so nothing may be written relative to
the current directory: everything goes under one absolute workdir (default ``~/ray_results/dearli``,
where Ray users look for results) and is reused by later runs::

    <workdir>/datasets/synth_400_100/           the synthetic world (shared by jobs/ssl.py and jobs/supervised.py)
    <workdir>/caches/<dataset>-<hash>/...       SAM masks and CLIP features (see dearli.caches.plan)
    <workdir>/runs/<run name>/                  one pipeline run: config, stages, evaluation, visualisations
    <workdir>/mlflow.db, mlartifacts/           the MLflow store when MLFLOW_TRACKING_URI is not set
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dearli.config import DEFAULT_WORKDIR
from dearli.data.synth.worlds import MAIN

SYNTH_SEED = MAIN.seed  # the embedded default world
_RUN_INDEX = re.compile(r"^(?P<prefix>.+)_(?P<index>\d{3,})$")


def resolve_workdir(workdir: str | Path | None) -> Path:
    """The absolute workdir (created): a relative path would land in Ray's temporary job directory."""
    path = Path(workdir or DEFAULT_WORKDIR).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def synth_path(workdir: Path, num_images: int, num_val: int) -> Path:
    return workdir / "datasets" / f"synth_{num_images}_{num_val}"


def synth_dataset(workdir: Path, num_images: int, num_val: int, echo: Callable[[str], Any] = print) -> Path:
    """The synthetic world under ``workdir/datasets``: reused when complete, written otherwise."""
    from dearli.data.synth.writer import write_synth_dataset

    root = synth_path(workdir, num_images, num_val)
    if (root / "dataset.yaml").is_file():  # written last: its presence means the world is complete
        echo(f"dataset: reusing the synthetic world {root}")
        return root
    # An interrupted earlier write left a partial world: replace it (overwrite only touches synth output).
    write_synth_dataset(root, num_images, SYNTH_SEED, num_val, overwrite=root.exists())
    echo(f"dataset: wrote the synthetic world ({num_images} train + {num_val} val images) to {root}")
    return root


def run_names(runs_dir: Path, prefix: str) -> list[str]:
    """Existing run names ``<prefix>_NNN``, oldest first."""
    if not runs_dir.is_dir():
        return []
    found = [(int(m["index"]), p.name) for p in runs_dir.iterdir()
             if p.is_dir() and (m := _RUN_INDEX.match(p.name)) and m["prefix"] == prefix]
    return [name for _, name in sorted(found)]


def next_run_name(runs_dir: Path, prefix: str, claim: bool = False) -> str:
    """The first unused ``<prefix>_NNN``: a new run never reuses a directory. With ``claim`` the directory
    is created here, atomically, so two runs started at once never get the same name."""
    taken = {int(_RUN_INDEX.match(n)["index"]) for n in run_names(runs_dir, prefix)}
    index = 0
    while True:
        while index in taken:
            index += 1
        name = f"{prefix}_{index:03d}"
        if not claim:
            return name
        try:
            (runs_dir / name).mkdir(parents=True)
            return name
        except FileExistsError:
            taken.add(index)


def latest_run_dir(runs_dir: Path) -> Path | None:
    """The most recently started run (by the time its config was written), for ``--resume``."""
    runs = [p for p in runs_dir.iterdir() if (p / "config.yaml").is_file()] if runs_dir.is_dir() else []
    return max(runs, key=lambda p: (p / "config.yaml").stat().st_mtime) if runs else None
