"""Which cache a run uses and what it lacks: a cache's identity is everything that changes what it holds (its
manifest's settings), hashed into its folder name, so other settings mean another cache; the pipeline builds
only the images a cache is missing.

    <workdir>/caches/<dataset>-<hash>/sam-<generator>-<hash>   SAM masks of the train split (warm-up targets)
    <workdir>/caches/<dataset>-<hash>/clip-<hash>               CLIP features of the val split (zero-shot baselines)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dearli.config import Config

SAM_SPLIT = "train"  # warm-up trains on the SAM masks of every training image, labeled or not
CLIP_SPLIT = "val"  # what the zero-shot baselines score (dearli baseline oracle | sam-clip)


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
