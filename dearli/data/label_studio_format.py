"""Label Studio's region format: the brush (Label Studio's RLE) and polygon regions of a mask as a labels tag
names them, the regions of a panoptic map's segments, and the category a region's label names.

Plain numpy: what ``dearli export label-studio``, ``dearli import label-studio`` and ``dearli serve``'s ML
backend share.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from dearli.data.label_studio_rle import encode_mask
from dearli.data.panoptic import Category, CategoryMap
from dearli.data.polygon import mask_polygons, signed_area

FROM_NAME = "label"  # the name of the labels tag in the config
TO_NAME = "image"  # the name of the image tag
BRUSH = "brushlabels"
POLYGON = "polygonlabels"
CROWD_NAME = "crowd"  # the per-region choices tag of the config
CROWD_CHOICE = "crowd"  # its choice: the region is a crowd (COCO's iscrowd)


def _region(region_id: str, kind: str, value: dict[str, Any], name: str, score: float, size: tuple[int, int],
            from_name: str, to_name: str) -> dict[str, Any]:
    height, width = size
    return {"id": region_id, "from_name": from_name, "to_name": to_name, "type": kind,
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {**value, kind: [name]}, "score": score}


def brush_region(region_id: str, mask: np.ndarray, name: str, score: float, from_name: str = FROM_NAME,
                 to_name: str = TO_NAME) -> dict[str, Any]:
    """A brushlabels region of an H×W bool mask (``from_name``: the labels tag, ``to_name``: the image tag)."""
    return _region(region_id, BRUSH, {"format": "rle", "rle": encode_mask(mask)}, name, score, mask.shape,
                   from_name, to_name)


def polygon_regions(region_id: str, mask: np.ndarray, name: str, score: float, from_name: str = FROM_NAME,
                    to_name: str = TO_NAME) -> list[dict[str, Any]]:
    """One polygonlabels region per part of an H×W bool mask (ids ``<region_id>_<k>``), largest first."""
    height, width = mask.shape
    regions = []
    for k, points in enumerate(mask_polygons(mask)):
        percent = (points * [100.0 / width, 100.0 / height]).tolist()
        value = {"points": percent, "closed": True}
        regions.append(_region(f"{region_id}_{k}", POLYGON, value, name, score, mask.shape, from_name, to_name))
    return regions


def segment_regions(segment_map: np.ndarray, segments: list[dict[str, Any]], polygons: bool = False,
                    from_name: str = FROM_NAME, to_name: str = TO_NAME) -> dict[str, Any]:
    """``{"result": regions, "score": mean class score}`` of a prediction: one brush region per segment
    (ids ``seg<segment id>``), or its polygons, labelled with the segment's ``category_name``.

    segment_map: H×W segment ids; segments: dicts with ``id``, ``category_name`` and ``score``."""
    result, scores = [], []
    for segment in segments:
        mask = segment_map == segment["id"]
        region_id, name, score = f"seg{segment['id']}", segment["category_name"], float(segment["score"])
        if polygons:
            result.extend(polygon_regions(region_id, mask, name, score, from_name, to_name))
        else:
            result.append(brush_region(region_id, mask, name, score, from_name, to_name))
        scores.append(score)
    if polygons:  # largest first: a polygon lying in another's filled hole comes later and wins on import
        result.sort(key=lambda region: -abs(signed_area(np.asarray(region["value"]["points"]))))
    return {"result": result, "score": float(np.mean(scores)) if scores else 0.0}


def class_lookup(categories: CategoryMap) -> Callable[[str], Category | None]:
    """name -> the category it names, or None: display name exactly, then case-insensitively, then a synonym
    that names one category only."""
    exact = {c.name: c for c in categories.categories}
    folded = {c.name.casefold(): c for c in categories.categories}
    synonyms: dict[str, list[Category]] = {}
    for category in categories.categories:
        for synonym in {s.casefold() for s in category.synonyms}:
            synonyms.setdefault(synonym, []).append(category)

    def lookup(name: str) -> Category | None:
        key = name.strip()
        found = exact.get(key) or folded.get(key.casefold())
        if found is None and len(synonyms.get(key.casefold(), ())) == 1:
            found = synonyms[key.casefold()][0]
        return found

    return lookup
