"""Pseudo-labels as Label Studio tasks: the labeling config and one pre-annotated task per image.

Each image of a ``dearli pseudo-label`` output becomes a task whose prediction has one region per segment,
labelled with the class's display name (its first synonym) and carrying the segment's class score:

- brush regions (the default): the segment's exact mask in Label Studio's brush RLE;
- polygon regions (``polygons=True``): the outer boundary of each part of the segment, points in percent
  of the image width and height. Holes are filled (a VOID hole becomes part of the segment), and the
  task's polygons are ordered largest first, so that on import, where a later region wins, a segment
  lying in another's hole is painted over it again.

The task's ``data.image`` is ``image_root`` followed by the image's path relative to ``document_root``
(URL-quoted). The default, ``/data/local-files/?d=`` under the parent of the folder holding the images,
is what Label Studio serves from a local folder (LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true,
LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=that parent, and a Local Files storage on the image folder);
``data.dearli_stem`` names the image for the import.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

import numpy as np
from PIL import Image

from dearli.data.coco_format import rgb2id
from dearli.data.label_studio_format import CROWD_CHOICE, CROWD_NAME, FROM_NAME, TO_NAME, segment_regions
from dearli.data.panoptic import CategoryMap
from dearli.errors import DataError

LOCAL_FILES = "/data/local-files/?d="  # Label Studio's URL of files served from its document root
STEM_KEY = "dearli_stem"  # task data field naming the image for the import


def label_config(names: Sequence[str], polygons: bool = False) -> str:
    """Label Studio's labeling config XML: one image, one brush (or polygon) labels tag with ``names``, and
    a per-region "crowd" choice (COCO's ``iscrowd``: a group of things too many to tell apart, one region)."""
    tag = "PolygonLabels" if polygons else "BrushLabels"
    labels = "".join(f"    <Label value={quoteattr(name)}/>\n" for name in names)
    return (f'<View>\n  <Image name="{TO_NAME}" value="${TO_NAME}" zoom="true"/>\n'
            f'  <{tag} name="{FROM_NAME}" toName="{TO_NAME}">\n{labels}  </{tag}>\n'
            f'  <Choices name="{CROWD_NAME}" toName="{TO_NAME}" perRegion="true" choice="multiple">\n'
            f'    <Choice value="{CROWD_CHOICE}" hint="a group of things of this class, too many to draw one by '
            f'one"/>\n  </Choices>\n</View>\n')


def image_url(path: str | Path, image_root: str, document_root: Path) -> str:
    """``image_root`` + the image's path below ``document_root``, URL-quoted (DataError outside it)."""
    path = Path(path)
    try:
        relative = path.resolve().relative_to(document_root.resolve())
    except ValueError:
        raise DataError(path, f"is not inside the document root {document_root}; pass --document-root") from None
    return image_root + quote(relative.as_posix(), safe="/")


def default_document_root(paths: Sequence[str | Path]) -> Path:
    """The parent of the deepest folder holding every image (Label Studio serves a child of its root)."""
    folders = [str(Path(p).resolve().parent) for p in paths]
    common = Path(os.path.commonpath(folders)) if folders else Path.cwd()
    return common.parent


def read_pseudo_labels(labels: str | Path) -> tuple[list[dict[str, Any]], CategoryMap]:
    """The published images of a ``dearli pseudo-label`` output (rows with image_path, height, width,
    file_name and segments with category_name and score), by stem, and its class list."""
    from dearli.caches.store import MANIFEST, CacheStore
    from dearli.predict.outputs import KIND, PANOPTIC_JSON, read_rows

    root = Path(labels)
    store = CacheStore(str(root))
    try:
        manifest = store.manifest() if (root / MANIFEST).is_file() else None
    except (OSError, ValueError) as err:
        raise DataError(root / MANIFEST, f"cannot read: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND or not (root / PANOPTIC_JSON).is_file():
        raise DataError(root, "is not the output folder of 'dearli pseudo-label' (cache.json and panoptic.json)")
    try:
        published = json.loads((root / PANOPTIC_JSON).read_text(encoding="utf-8"))
        names = {ann["file_name"] for ann in published["annotations"]}
        categories = CategoryMap.from_dicts(published["categories"], root / PANOPTIC_JSON)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(root / PANOPTIC_JSON, f"cannot read the published labels: {err}") from None
    return [row for row in read_rows(store) if row["file_name"] in names], categories


def model_version(labels: str | Path) -> str:
    """``dearli-<first 12 hex digits of the checkpoint's SHA-256>``, else the output folder's name."""
    from dearli.caches.store import CacheStore

    settings = (CacheStore(str(labels)).manifest() or {}).get("settings", {})
    digest = settings.get("checkpoint_sha256")
    return f"dearli-{digest[:12]}" if digest else Path(labels).name


def _segment_map(path: Path, row: dict[str, Any]) -> np.ndarray:
    try:
        with Image.open(path) as png:
            ids = rgb2id(np.asarray(png.convert("RGB")))
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(path, f"cannot read the panoptic PNG: {err}") from None
    if ids.shape != (row["height"], row["width"]):
        raise DataError(path, f"is {ids.shape[1]}x{ids.shape[0]}, the labels say {row['width']}x{row['height']}")
    return ids


def task_for_image(row: dict[str, Any], segment_map: np.ndarray, url: str, version: str,
                   polygons: bool = False) -> dict[str, Any]:
    """One task: the image's URL and stem, and a prediction with one region per segment of the row.

    segment_map: H×W segment ids of the row's PNG; row: as :func:`read_pseudo_labels` gives it."""
    prediction = {"model_version": version, **segment_regions(segment_map, row["segments"], polygons)}
    return {"data": {TO_NAME: url, STEM_KEY: row["stem"]}, "predictions": [prediction]}


def tasks_from_rows(labels: str | Path, rows: list[dict[str, Any]], image_root: str, document_root: Path,
                    polygons: bool, version: str) -> list[dict[str, Any]]:
    """The tasks of rows of the pseudo-label output ``labels`` (see :func:`tasks_from_pseudo_labels`)."""
    from dearli.predict.outputs import PANOPTIC_DIR

    tasks = []
    for row in rows:
        segment_map = _segment_map(Path(labels) / PANOPTIC_DIR / row["file_name"], row)
        url = image_url(row["image_path"], image_root, document_root)
        tasks.append(task_for_image(row, segment_map, url, version, polygons))
    return tasks


def tasks_from_pseudo_labels(labels: str | Path, image_root: str = LOCAL_FILES,
                             document_root: str | Path | None = None, polygons: bool = False,
                             version: str | None = None) -> list[dict[str, Any]]:
    """Label Studio tasks (the list its JSON import takes) of every image of a pseudo-label output.

    ``document_root`` defaults to :func:`default_document_root` of the images, ``version`` (the predictions'
    model_version) to :func:`model_version`."""
    rows, _ = read_pseudo_labels(labels)
    root = default_document_root([r["image_path"] for r in rows]) if document_root is None else Path(document_root)
    version = model_version(labels) if version is None else version
    return tasks_from_rows(labels, rows, image_root, root, polygons, version)


def class_names(categories: CategoryMap, source: str | Path | None = None) -> list[str]:
    """The labels of the config: display names in category order (DataError naming ``source`` if two are
    the same)."""
    names = categories.names
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataError(source, f"classes {', '.join(twice)} share a display name; Label Studio needs one label "
                              "per class (rename them in the class list)")
    return names
