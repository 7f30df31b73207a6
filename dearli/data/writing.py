"""Helpers shared by the dataset writers: segment statistics, PNG/JSON output, no-clobber checks."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from dearli.data.coco_format import id2rgb
from dearli.errors import DataError

T = TypeVar("T")
R = TypeVar("R")


def mask_area_bbox(mask: np.ndarray) -> tuple[int, list[int]]:
    """Pixel count and COCO bbox [x, y, width, height] of a non-empty H×W bool mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return 0, [0, 0, 0, 0]
    x, y = int(cols[0]), int(rows[0])
    return int(mask.sum()), [x, y, int(cols[-1]) - x + 1, int(rows[-1]) - y + 1]


def segment_entry(segment_id: int, category_id: int, mask: np.ndarray, iscrowd: bool = False) -> dict[str, Any]:
    """A COCO panoptic ``segments_info`` entry with area and bbox measured on ``mask`` (H×W bool)."""
    area, bbox = mask_area_bbox(mask)
    return {"id": int(segment_id), "category_id": int(category_id), "area": area, "bbox": bbox,
            "iscrowd": int(bool(iscrowd))}


def save_panoptic_png(path: Path, segment_map: np.ndarray) -> None:
    """Write H×W segment ids as an RGB panoptic PNG."""
    Image.fromarray(id2rgb(segment_map)).save(path)


def save_semantic_png(path: Path, semantic: np.ndarray) -> None:
    """Write an H×W uint8 semantic map (training ids, 255 = ignore)."""
    Image.fromarray(np.asarray(semantic, dtype=np.uint8), mode="L").save(path)


def save_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file so an interrupted run never leaves a half-written file."""
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def refuse_existing(paths: Iterable[Path], overwrite: bool) -> None:
    """DataError listing the outputs that already exist, unless ``overwrite``."""
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        names = ", ".join(str(p) for p in existing[:4]) + (" ..." if len(existing) > 4 else "")
        raise DataError(existing[0], f"output already exists ({names}); pass --overwrite to replace it, "
                                     "or choose another --out")


def relative_to(target: Path, start: Path) -> str:
    """``target`` as a path relative to ``start`` (with ``..`` when needed), POSIX separators."""
    return Path(os.path.relpath(target.resolve(), start.resolve())).as_posix()


class _Guarded:
    """Runs ``fn`` in a worker and ships a DataError back as (path, problem): DataError's two-argument
    constructor does not survive pickling."""

    def __init__(self, fn: Callable[[Any], Any]):
        self.fn = fn

    def __call__(self, item: Any) -> Any:
        try:
            return self.fn(item)
        except DataError as err:
            return _Failure(err.path, err.problem)


class _Failure:
    def __init__(self, path: str | None, problem: str):
        self.path, self.problem = path, problem


def parallel_map(fn: Callable[[T], R], items: Sequence[T], workers: int, desc: str,
                 progress: bool) -> Iterator[R]:
    """``map(fn, items)`` in order, over ``workers`` processes when > 1, with a tqdm bar."""
    from tqdm import tqdm

    bar = tqdm(total=len(items), desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    try:
        if workers <= 1:
            for item in items:
                yield fn(item)
                bar.update()
            return
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for result in pool.imap(_Guarded(fn), items, chunksize=8):
                if isinstance(result, _Failure):
                    raise DataError(result.path, result.problem)
                yield result
                bar.update()
    finally:
        bar.close()
