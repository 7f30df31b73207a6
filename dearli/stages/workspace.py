"""The pipeline's working directory: datasets, caches, runs and the local MLflow store, at stable paths.

A Ray job runs in a temporary copy of the submitted directory, so nothing may be written relative to
the current directory: everything goes under one absolute workdir (default ``~/ray_results/dearli``,
where Ray users look for results) and is reused by later runs::

    <workdir>/datasets/synth_400_100/           the synthetic world (shared by jobs/ssl.py and jobs/supervised.py)
    <workdir>/caches/<dataset>-<hash>/sam-...   SAM masks of the train split (warm-up targets)
    <workdir>/caches/<dataset>-<hash>/clip-...  CLIP features of the val split (zero-shot baselines)
    <workdir>/runs/<run name>/                  one pipeline run: config, stages, evaluation, visualisations
    <workdir>/mlflow.db, mlartifacts/           the MLflow store when MLFLOW_TRACKING_URI is not set
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dearli.config import DEFAULT_WORKDIR, Config
from dearli.errors import DataError

__all__ = ["DEFAULT_WORKDIR"]  # re-exported: the jobs and the report read it from here
SYNTH_SEED = 0  # the embedded default world
SAM_SPLIT = "train"  # warm-up trains on the SAM masks of every training image, labeled or not
CLIP_SPLIT = "val"  # what the zero-shot baselines score (dearli baseline oracle | sam-clip)
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


def _short_hash(values: Any) -> str:
    return hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:8]


def cache_folder(workdir: Path, dataset: str | Path) -> Path:
    """One folder per dataset directory (its name plus a hash of its absolute path)."""
    dataset = Path(dataset).expanduser().resolve()
    return workdir / "caches" / f"{dataset.name}-{_short_hash(str(dataset))}"


def sam_cache_args(cfg: Config, generator: str) -> list[str]:
    """``dearli cache sam`` options from the config's cache section (everything that changes the masks)."""
    c = cfg.cache
    args = ["--generator", generator, "--images-per-part", str(c.images_per_part)]
    if generator == "sam":
        args += ["--sam-type", c.sam_type, "--sam-checkpoint", c.sam_checkpoint,
                 "--points-per-side", str(c.points_per_side), "--points-per-batch", str(c.points_per_batch),
                 "--pred-iou-thresh", str(c.pred_iou_thresh), "--stability-score-thresh",
                 str(c.stability_score_thresh)]
    return args


def clip_cache_args(cfg: Config) -> list[str]:
    """``dearli cache clip`` options: the config's backbone and test-time scale."""
    m = cfg.model
    return ["--model", m.backbone.clip_model, "--pretrained", m.backbone.pretrained,
            "--short-side", str(m.inference.test_short_side), "--max-size", str(m.inference.test_max_size),
            "--images-per-part", str(cfg.cache.images_per_part)]


def default_cache_uri(workdir: Path, dataset: str, kind: str, args: list[str]) -> str:
    """``<workdir>/caches/<dataset>/<kind>-<hash of the settings>``: other settings, other cache."""
    return str(cache_folder(workdir, dataset) / f"{kind}-{_short_hash(args)}")


def missing_images(uri: str, kind: str, dataset: str, split: str) -> int:
    """How many images of ``split`` the cache at ``uri`` lacks (all of them when there is no cache)."""
    from dearli.caches.commands import image_rows
    from dearli.caches.readers import CacheReader
    from dearli.caches.store import CacheStore

    _, rows = image_rows(dataset, split)
    if CacheStore(uri).manifest() is None:
        return len(rows)
    cached = set(CacheReader(uri, kind))
    return sum(r["stem"] not in cached for r in rows)


def run_cache_command(kind: str, dataset: str, split: str, uri: str, options: list[str], actors: int) -> None:
    """Run ``dearli cache KIND`` in this process (errors propagate as DearliError)."""
    import argparse

    from dearli.caches import commands as cache_commands

    parser = argparse.ArgumentParser(prog="dearli")
    cache_commands.register(parser.add_subparsers(dest="command"))
    argv = ["cache", kind, "--dataset", dataset, "--split", split, "--out", uri, "--actors", str(actors), *options]
    args = parser.parse_args(argv)
    code = args.handler(args)
    if code:
        raise DataError(uri, f"'dearli {' '.join(argv[:2])}' failed with exit code {code}")


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
