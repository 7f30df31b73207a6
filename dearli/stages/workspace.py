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
from dearli.data.synth.worlds import MAIN

__all__ = ["DEFAULT_WORKDIR"]  # re-exported: the jobs and the report read it from here
SYNTH_SEED = MAIN.seed  # the embedded default world
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


def sam_spec(cfg: Config, generator: str) -> Any:
    """The GeneratorSpec of the run's SAM cache (``generator``: sam, or the felzenszwalb stand-in)."""
    from dearli.caches.generators import GeneratorSpec

    c = cfg.cache
    if generator != "sam":
        return GeneratorSpec(kind=generator)
    checkpoint = str(Path(c.sam_checkpoint).expanduser().resolve()) if c.sam_checkpoint else ""
    return GeneratorSpec(kind="sam", sam_type=c.sam_type, sam_checkpoint=checkpoint,
                         points_per_side=c.points_per_side, points_per_batch=c.points_per_batch,
                         pred_iou_thresh=c.pred_iou_thresh, stability_score_thresh=c.stability_score_thresh)


def clip_cache_settings(cfg: Config) -> dict[str, Any]:
    """The settings of the run's CLIP cache: the config's backbone and test-time scale."""
    from dearli.caches.clip_features import clip_settings

    m = cfg.model
    return clip_settings(m.backbone.clip_model, m.backbone.pretrained, m.inference.test_short_side,
                         m.inference.test_max_size, m.inference.size_divisibility)


def cache_settings(cfg: Config, generator: str) -> dict[str, dict[str, Any]]:
    """{"sam": ..., "clip": ...}: everything that changes what each cache holds (its manifest's settings)."""
    return {"sam": sam_spec(cfg, generator).settings(), "clip": clip_cache_settings(cfg)}


def default_cache_uri(workdir: Path, dataset: str, kind: str, settings: dict[str, Any]) -> str:
    """``<workdir>/caches/<dataset>/<kind>-<hash of the settings>``: other settings, other cache."""
    return str(cache_folder(workdir, dataset) / f"{kind}-{_short_hash(settings)}")


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


def build_cache(kind: str, cfg: Config, generator: str, split: str, uri: str, actors: int,
                echo: Callable[[str], Any] = print) -> None:
    """Compute the images of ``split`` missing from the run's ``kind`` cache at ``uri``, in this process
    (Ray actor pools; errors propagate as DearliError)."""
    from dearli.caches.commands import PoolOptions, build_clip_cache, build_sam_cache

    pool = PoolOptions(actors=actors, images_per_part=cfg.cache.images_per_part)
    if kind == "sam":
        build_sam_cache(cfg.data.dataset, split, uri, sam_spec(cfg, generator), pool, echo)
    else:
        build_clip_cache(cfg.data.dataset, split, uri, clip_cache_settings(cfg), pool, echo)


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
