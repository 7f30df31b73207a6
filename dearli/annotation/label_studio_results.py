"""Label Studio's JSON export read back: per image, the regions of its latest annotation as masks.

The export is a list of tasks, each with ``data`` and ``annotations`` (each with ``result``, the regions, and
``was_cancelled``). Of a task, the latest annotation that was not cancelled counts (latest by ``updated_at``,
then ``created_at``, then ``id``); a task without one contributes nothing. Its image is ``data.dearli_stem``
(written by the export), else the file name, without extension, at the end of ``data.image`` (or of its
``?d=`` parameter). When two tasks name one image, the later in the file counts.

A region comes in one result (``brushlabels`` or ``polygonlabels``: the shape and its label together, what
dearli's export writes) or in two results sharing an ``id`` (``brush`` or ``polygon`` plus ``labels``: what a
config with separate ``<Brush>``/``<Polygon>`` and ``<Labels>`` tags makes); both read the same.

Brush regions are decoded from their RLE (a pixel belongs to the region when its alpha is at least 128),
polygon regions rasterised (a pixel belongs when its centre lies inside). A region is a crowd (COCO's
``iscrowd``) when a per-region ``choices`` result with its ``id`` has the choice "crowd" selected (the
export's config has that tag). Whatever cannot be used is returned as a :class:`Problem` saying what and
why, never dropped silently.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np

from dearli.annotation.label_studio import STEM_KEY
from dearli.data.label_studio_format import BRUSH, CROWD_CHOICE, CROWD_NAME, POLYGON, TO_NAME
from dearli.data.label_studio_rle import RleError, decode_mask
from dearli.data.polygon import polygon_mask
from dearli.errors import DataError

# Kinds of problem, and what each means.
PROBLEM_KINDS = {
    "no-image": "the task's data names no image",
    "not-in-dataset": "the image is not in the dataset split",
    "not-annotated": "the task has no annotation that was not cancelled",
    "superseded": "a later task of the export names the same image",
    "unsupported": "a region of another type than brushlabels or polygonlabels (or brush/polygon with labels)",
    "no-label": "a region without exactly one class label",
    "size-mismatch": "a region drawn on an image of another size than the dataset's",
    "undecodable": "a brush RLE or polygon that cannot be read",
    "empty-mask": "a region without a pixel",
    "unknown-class": "a label that names no class of the dataset",
    "hidden": "a region whose every pixel a later region painted over",
    "crowd-stuff": "a crowd flag on a region of a stuff class (stuff has no instances): imported without it",
    "nothing-usable": "an annotation without a usable region: the image is not imported",
}


@dataclass(frozen=True)
class Problem:
    """Something of the export that is not imported: its ``kind`` (a key of PROBLEM_KINDS) and why."""

    kind: str
    detail: str
    task: Any = None
    stem: str | None = None
    region: str | None = None
    label: str | None = None

    def line(self) -> str:
        where = f"task {self.task}" + (f" ({self.stem})" if self.stem else "")
        where += f" region {self.region}" if self.region is not None else ""
        where += f" [{self.label}]" if self.label is not None else ""
        return f"{where}: {self.kind}: {self.detail}"


@dataclass
class Region:
    """One usable region: its id in the annotation, its class label, its H×W bool mask, whether a crowd."""

    region_id: str
    label: str
    mask: np.ndarray
    crowd: bool = False


@dataclass
class AnnotatedImage:
    """The regions of the annotation that counts for one image, in the annotation's order."""

    task: Any
    stem: str
    regions: list[Region] = field(default_factory=list)


class RegionError(Exception):
    """A region that cannot be used, with its problem kind."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


def read_export(path: str | Path) -> list[dict[str, Any]]:
    """The tasks of a Label Studio JSON export (DataError naming the file if it is not one)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(path, "not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(path, f"cannot read JSON: {err}") from None
    if not isinstance(data, list) or not all(isinstance(task, dict) for task in data):
        raise DataError(path, "is not Label Studio's JSON export: expected a list of tasks (export with 'JSON', "
                              "not 'JSON-MIN')")
    return data


def task_stem(task: dict[str, Any]) -> str | None:
    """The image a task is about: ``data.dearli_stem``, else the stem of the file ``data.image`` names."""
    data = task.get("data") if isinstance(task.get("data"), dict) else {}
    stem = data.get(STEM_KEY)
    if isinstance(stem, str) and stem:
        return stem
    url = data.get(TO_NAME)
    if not isinstance(url, str) or not url:
        return None
    parts = urlsplit(url)
    path = (parse_qs(parts.query).get("d") or [unquote(parts.path)])[0]
    return PurePosixPath(PurePosixPath(path.replace("\\", "/")).name).stem or None


def latest_annotation(task: dict[str, Any]) -> dict[str, Any] | None:
    """The latest annotation of a task that was not cancelled, or None."""
    kept = [(i, a) for i, a in enumerate(task.get("annotations") or [])
            if isinstance(a, dict) and not a.get("was_cancelled")]
    if not kept:
        return None

    def order(item: tuple[int, dict[str, Any]]) -> tuple[str, int, int]:
        index, annotation = item
        ident = annotation.get("id")
        return (str(annotation.get("updated_at") or annotation.get("created_at") or ""),
                ident if isinstance(ident, int) else -1, index)

    return max(kept, key=order)[1]


def region_label(result: dict[str, Any]) -> str:
    """The one class label of a brush or polygon region (RegionError otherwise)."""
    kind, value = result.get("type"), result.get("value")
    if kind not in (BRUSH, POLYGON) or not isinstance(value, dict):
        raise RegionError("unsupported", f"region type {kind!r}: only {BRUSH} and {POLYGON} are imported")
    labels = value.get(kind)
    if not (isinstance(labels, list) and len(labels) == 1 and isinstance(labels[0], str)):
        raise RegionError("no-label", f"needs exactly one class label, has {labels!r}")
    return labels[0]


def _check_size(result: dict[str, Any], height: int, width: int) -> None:
    size = (result.get("original_width"), result.get("original_height"))
    if size != (None, None) and size != (width, height):
        raise RegionError("size-mismatch", f"drawn on a {size[0]}x{size[1]} image, the dataset's is {width}x{height}")


def _polygon_points(value: dict[str, Any]) -> np.ndarray:
    try:
        points = np.asarray(value.get("points"), dtype=float)
    except (TypeError, ValueError):
        points = np.zeros((0,))
    if points.ndim != 2 or points.shape[1] != 2 or len(points) < 3 or not np.isfinite(points).all():
        raise RegionError("undecodable", "polygon points must be at least 3 finite [x, y] pairs (percent)")
    return points


def region_mask(result: dict[str, Any], height: int, width: int) -> np.ndarray:
    """The H×W bool mask of a brush or polygon region of an image of that size (RegionError if unusable)."""
    _check_size(result, height, width)
    value = result["value"]
    if result["type"] == POLYGON:
        return polygon_mask(_polygon_points(value) * [width / 100.0, height / 100.0], height, width)
    rle = value.get("rle", result.get("rle"))
    if value.get("format", "rle") != "rle" or rle is None:
        raise RegionError("undecodable", f"brush region without an RLE (format {value.get('format')!r})")
    try:
        return decode_mask(rle, height, width)
    except RleError as err:
        raise RegionError("undecodable", f"brush RLE: {err}") from None


SPLIT_SHAPES = {"brush": BRUSH, "polygon": POLYGON}  # a shape result without its label -> the combined type


def combine_split_regions(results: list[Any]) -> list[Any]:
    """Results with each split region (a ``brush``/``polygon`` result and a ``labels`` result of the same
    ``id``) made one ``brushlabels``/``polygonlabels`` result, at the shape's place; anything else as it is.

    A shape without a ``labels`` result gets no label (a "no-label" problem later); a ``labels`` result
    without a shape stays as it is (an "unsupported" region)."""
    labels = {r["id"]: r for r in results
              if isinstance(r, dict) and r.get("type") == "labels" and isinstance(r.get("value"), dict)
              and isinstance(r.get("id"), str)}
    combined, used = [], set()
    for result in results:
        shape = SPLIT_SHAPES.get(result.get("type")) if isinstance(result, dict) else None
        if shape is not None and isinstance(result.get("value"), dict):
            rid = result.get("id")
            companion = labels.get(rid) if isinstance(rid, str) else None
            names = companion["value"].get("labels") if companion is not None else None
            if companion is not None:
                used.add(rid)
            result = {**result, "type": shape, "value": {**result["value"], shape: names}}
        combined.append(result)
    return [r for r in combined
            if not (isinstance(r, dict) and r.get("type") == "labels" and isinstance(r.get("id"), str)
                    and r["id"] in used)]


def crowd_regions(results: list[Any]) -> tuple[set[str], list[Any]]:
    """The ids of the regions marked crowd, and the results without the per-region crowd choices.

    A crowd choice is a ``choices`` result with a region's ``id`` from the "crowd" tag or with the choice
    "crowd" (any case); the region is a crowd when that choice is selected. Other choices results stay (an
    "unsupported" region later)."""
    crowd, rest = set(), []
    for result in results:
        marked = _crowd_choice(result)
        if marked is None:
            rest.append(result)
        elif marked:
            crowd.add(result["id"])
    return crowd, rest


def _crowd_choice(result: Any) -> bool | None:
    """None if ``result`` is no per-region crowd choice, else whether it selects "crowd"."""
    if not (isinstance(result, dict) and result.get("type") == "choices" and isinstance(result.get("id"), str)):
        return None
    choices = result["value"].get("choices") if isinstance(result.get("value"), dict) else None
    choices = choices if isinstance(choices, list) else []
    selected = any(isinstance(c, str) and c.casefold() == CROWD_CHOICE for c in choices)
    return selected if selected or result.get("from_name") == CROWD_NAME else None


def _regions(annotation: dict[str, Any], size: tuple[int, int], task: Any, stem: str,
             problems: list[Problem]) -> list[Region]:
    results = annotation.get("result")
    crowd, results = crowd_regions(results) if isinstance(results, list) else (set(), [])
    regions = []
    for k, result in enumerate(combine_split_regions(results)):
        region_id, label = f"#{k + 1}", None
        try:
            if not isinstance(result, dict):
                raise RegionError("unsupported", f"a result entry is not an object: {str(result)[:60]}")
            region_id = str(result.get("id", region_id))
            label = region_label(result)
            regions.append(Region(region_id, label, region_mask(result, *size), region_id in crowd))
        except RegionError as err:
            problems.append(Problem(err.kind, err.detail, task, stem, region_id, label))
    return regions


def annotated_images(tasks: list[dict[str, Any]], size_of: Callable[[str], tuple[int, int] | None]
                     ) -> tuple[list[AnnotatedImage], list[Problem]]:
    """The images of the tasks with their usable regions, and every problem met on the way.

    ``size_of(stem)``: the dataset's (height, width) of an image, None if the dataset has no such image."""
    images: dict[str, AnnotatedImage] = {}
    problems: list[Problem] = []
    for index, task in enumerate(tasks):
        task_id = task.get("id", f"#{index + 1}")
        stem = task_stem(task)
        size = None if stem is None else size_of(stem)
        annotation = None if size is None else latest_annotation(task)
        if stem is None:
            problems.append(Problem("no-image", PROBLEM_KINDS["no-image"], task_id))
        elif size is None:
            problems.append(Problem("not-in-dataset", f"no image '{stem}' in the dataset split", task_id, stem))
        elif annotation is None:
            problems.append(Problem("not-annotated", PROBLEM_KINDS["not-annotated"], task_id, stem))
        else:
            if stem in images:
                problems.append(Problem("superseded", f"task {task_id} names the same image later in the export",
                                        images[stem].task, stem))
            images[stem] = AnnotatedImage(task_id, stem, _regions(annotation, size, task_id, stem, problems))
    return list(images.values()), problems
