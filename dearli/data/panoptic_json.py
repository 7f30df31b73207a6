"""Parsing and validation of COCO panoptic JSON files into :class:`~dearli.data.panoptic.PanopticSplit`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dearli.data.panoptic import CategoryMap, PanopticSplit
from dearli.data.panoptic_records import PanopticRecord, RecordTable, SegmentInfo
from dearli.errors import DataError


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(path, "panoptic JSON not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(path, f"cannot parse JSON: {err}") from None
    if not isinstance(data, dict):
        raise DataError(path, "top level must be an object with 'images', 'annotations', 'categories'")
    return data



def _image_key(image_id: Any) -> str:
    # Annotations may spell an integer id as a string (or the other way round); match on the text.
    return str(image_id)


def parse_records(data: dict[str, Any], json_path: Path, image_dir: Path, panoptic_dir: Path,
                   semantic_dir: Path | None, cats: CategoryMap,
                   problems: list[DataError] | None) -> RecordTable:
    """Join ``images`` with ``annotations`` into records (kept in columns), validating every field."""
    images, annotations = data.get("images"), data.get("annotations", [])
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise DataError(json_path, "'images' and 'annotations' must be lists")
    by_image: dict[str, dict[str, Any]] = {}
    for ann in annotations:
        if not isinstance(ann, dict) or "image_id" not in ann or "file_name" not in ann:
            raise DataError(json_path, f"annotation without 'image_id'/'file_name': {str(ann)[:200]}")
        by_image[_image_key(ann["image_id"])] = ann
    records, stems = RecordTable(), set()
    for image in images:
        ann = by_image.pop(_image_key(image.get("id")), None) if isinstance(image, dict) else None
        try:
            rec = _parse_image(image, ann, json_path, image_dir, panoptic_dir, semantic_dir, cats)
        except DataError as err:
            if problems is None:
                raise
            problems.append(err)
            continue
        if rec.stem in stems:
            raise DataError(json_path, f"two images share the file stem '{rec.stem}'")
        stems.add(rec.stem)
        records.append(rec)
    if by_image:
        orphan = next(iter(by_image))
        raise DataError(json_path, f"{len(by_image)} annotations refer to image ids absent from 'images' "
                                   f"(e.g. {orphan!r})")
    return records


def _parse_image(image: Any, ann: dict[str, Any] | None, json_path: Path, image_dir: Path,
                 panoptic_dir: Path, semantic_dir: Path | None, cats: CategoryMap) -> PanopticRecord:
    if not isinstance(image, dict) or not all(k in image for k in ("id", "file_name", "height", "width")):
        raise DataError(json_path, f"image entry needs id, file_name, height, width: {str(image)[:200]}")
    file_name = str(image["file_name"])
    where = f"image {image['id']!r} ({file_name})"
    height, width = image["height"], image["width"]
    if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
        raise DataError(json_path, f"{where}: height/width must be positive integers")
    segments: list[SegmentInfo] = []
    if ann is not None:
        seen: set[int] = set()
        for seg in ann.get("segments_info", []):
            info = _parse_segment(seg, cats, json_path, where)
            if info.id in seen:
                raise DataError(json_path, f"{where}: segment id {info.id} is listed twice")
            seen.add(info.id)
            segments.append(info)
    png_name = None if ann is None else str(ann["file_name"])
    stem = Path(file_name).stem
    return PanopticRecord(
        image_id=image["id"], stem=stem, image_path=image_dir / file_name,
        panoptic_path=None if png_name is None else panoptic_dir / png_name,
        height=height, width=width, segments_info=tuple(segments),
        semantic_path=None if semantic_dir is None or png_name is None else semantic_dir / png_name,
    )


def _parse_segment(seg: Any, cats: CategoryMap, json_path: Path, where: str) -> SegmentInfo:
    if not isinstance(seg, dict) or "id" not in seg or "category_id" not in seg:
        raise DataError(json_path, f"{where}: segment without 'id'/'category_id': {seg!r}")
    seg_id, cat_id = seg["id"], seg["category_id"]
    if not isinstance(seg_id, int) or not 0 < seg_id < 256**3:
        raise DataError(json_path, f"{where}: segment id {seg_id!r} must be an integer in 1..256^3-1")
    if cat_id not in cats:
        raise DataError(json_path, f"{where}: segment {seg_id} has unknown category id {cat_id!r}")
    bbox = seg.get("bbox") or (0, 0, 0, 0)
    return SegmentInfo(id=seg_id, category_id=int(cat_id), label=cats.to_contiguous(cat_id),
                       iscrowd=bool(seg.get("iscrowd", 0)), area=int(seg.get("area", 0)),
                       bbox=tuple(float(v) for v in bbox))


def read_split(json_path: str | Path, image_dir: str | Path, panoptic_dir: str | Path,
               semantic_dir: str | Path | None = None, categories: CategoryMap | None = None,
               name: str = "", problems: list[DataError] | None = None) -> PanopticSplit:
    """Parse a COCO panoptic JSON.

    ``categories`` defaults to the JSON's own categories. With ``problems`` given, per-image
    problems (unknown category, duplicate segment id, ...) are appended there and the offending
    image is dropped instead of raising, so a checker can report them all.
    """
    json_path = Path(json_path)
    data = read_json(json_path)
    # A JSON without categories is fine when the dataset defines them (classes.json).
    has_own = categories is None or bool(data.get("categories"))
    own = CategoryMap.from_dicts(data.get("categories"), json_path) if has_own else None
    cats = own if categories is None else categories
    for cat in [] if own is None else own.categories:
        # A shared map (classes.json, or another split's) must agree with this file's categories.
        if cat.id not in cats or cats.category(cat.id).isthing != cat.isthing:
            raise DataError(json_path, f"category {cat.id} ('{cat.name}') is missing from the dataset's "
                                       "classes or disagrees with them on 'isthing'")
    records = parse_records(data, json_path, Path(image_dir), Path(panoptic_dir),
                            None if semantic_dir is None else Path(semantic_dir), cats, problems)
    return PanopticSplit(name or json_path.stem, json_path, cats, records)
