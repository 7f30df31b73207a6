"""COCO panoptic (133 classes) -> COCO-Objects (81 classes: background + the 80 COCO things).

Every thing segment is kept as an instance (crowd flag included) with its COCO category id; all stuff
and VOID pixels of an image become ONE background segment (category id 0), so the result has no VOID.
Works on any panoptic dataset whose category ids do not use 0 for a thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dearli.data.classes import (
    BACKGROUND_ID,
    BACKGROUND_NAME,
    load_vocabulary,
    own_classes_file,
    vocabulary_matches,
)
from dearli.data.dataset import DATASET_FILE, SplitSpec, load_dataset, write_dataset_yaml
from dearli.data.panoptic import Category, CategoryMap, read_segment_map
from dearli.data.panoptic_records import PanopticRecord
from dearli.data.writing import (
    parallel_map,
    refuse_existing,
    relative_to,
    save_json,
    save_panoptic_png,
    save_semantic_png,
    segment_entry,
)
from dearli.errors import DataError

BACKGROUND_SEGMENT_ID = 1  # things follow as 2..N+1


def objects_categories(source: CategoryMap, where: str | Path = "categories") -> CategoryMap:
    """Background (id 0, stuff) + the thing categories of ``source``."""
    things = [source.categories[i] for i in source.thing_ids]
    if not things:
        raise DataError(where, "the dataset has no thing categories")
    if BACKGROUND_ID in source and source.category(BACKGROUND_ID).isthing:
        raise DataError(where, f"thing category id {BACKGROUND_ID} collides with the background id")
    background = Category(BACKGROUND_ID, BACKGROUND_NAME, False, (BACKGROUND_NAME,), (0, 0, 0))
    return CategoryMap([background] + things, where)


def convert_to_objects(segment_map: np.ndarray, things: list[tuple[int, int, bool]],
                       categories: CategoryMap) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Merge everything but things into one background segment.

    Args:
        segment_map: H×W int64 input segment ids.
        things: (segment id, category id, iscrowd) of the input's thing segments.
        categories: the output category map (see :func:`objects_categories`).
    Returns:
        H×W int64 output segment map (no VOID), H×W uint8 semantic map (training ids), ``segments_info``.
    """
    out = np.full(segment_map.shape, BACKGROUND_SEGMENT_ID, dtype=np.int64)
    semantic = np.full(segment_map.shape, categories.to_contiguous(BACKGROUND_ID), dtype=np.uint8)
    segments: list[dict[str, Any]] = []
    for index, (seg_id, cat_id, iscrowd) in enumerate(things):
        mask = segment_map == seg_id
        out[mask] = BACKGROUND_SEGMENT_ID + 1 + index
        semantic[mask] = categories.to_contiguous(cat_id)  # crowd regions keep their class
        segments.append(segment_entry(BACKGROUND_SEGMENT_ID + 1 + index, cat_id, mask, iscrowd))
    background = out == BACKGROUND_SEGMENT_ID
    if background.any():
        segments.insert(0, segment_entry(BACKGROUND_SEGMENT_ID, BACKGROUND_ID, background))
    return out, semantic, segments


def _dataset_names(info: Any) -> CategoryMap:
    """The input's categories without the synonyms its vocabulary gave them: those stay out of the written
    JSON (the output names its own vocabulary in dataset.yaml instead)."""
    vocabulary = load_vocabulary(info.vocabulary) if info.vocabulary is not None else {}
    return CategoryMap([Category(c.id, c.name, c.isthing, (c.name,) if vocabulary.get(c.id) == c.synonyms
                                 else c.synonyms, c.color) for c in info.categories.categories], info.source)


@dataclass(frozen=True)
class _Job:
    record: PanopticRecord
    json_path: Path
    categories: CategoryMap
    panoptic_out: Path
    semantic_out: Path


def _convert_one(job: _Job) -> dict[str, Any]:
    rec = job.record
    segment_map = read_segment_map(rec, job.json_path)
    things = [(s.id, s.category_id, s.iscrowd) for s in rec.segments_info if s.category_id in job.categories
              and job.categories.category(s.category_id).isthing]
    out, semantic, segments = convert_to_objects(segment_map, things, job.categories)
    save_panoptic_png(job.panoptic_out, out)
    save_semantic_png(job.semantic_out, semantic)
    return {"image": {"id": rec.image_id, "file_name": rec.image_path.name, "height": rec.height,
                      "width": rec.width},
            "annotation": {"image_id": rec.image_id, "file_name": job.panoptic_out.name,
                           "segments_info": segments}}


def _outputs(out: Path, split: str) -> tuple[Path, Path, Path]:
    ann = out / "annotations"
    return ann / f"panoptic_{split}.json", ann / f"panoptic_{split}", ann / f"semantic_{split}"


def prepare_coco_objects(root: str | Path, out: str | Path | None = None, overwrite: bool = False,
                         partitions: str | Path | None = None, workers: int = 1,
                         progress: bool = True) -> Path:
    """Convert the panoptic dataset at ``root`` (COCO layout or dataset.yaml) into ``out``.

    ``out`` defaults to ``root/coco_objects``; images are not copied (dataset.yaml points at them).
    Partitions default to the input's. Existing outputs are never replaced unless ``overwrite``. When
    the classes are COCO's, the output's dataset.yaml names the shipped ``coco_objects`` vocabulary;
    ``out/classes.json``, if the user put one there, names the classes instead.
    """
    info = load_dataset(root)
    out = Path(root) / "coco_objects" if out is None else Path(out)
    refuse_existing([out / DATASET_FILE] + [p for s in info.split_names for p in _outputs(out, s)], overwrite)
    specs: dict[str, SplitSpec] = {}
    categories: CategoryMap | None = None
    for name in info.split_names:
        split = info.split(name)
        categories = categories or objects_categories(_dataset_names(info), split.json_path)
        json_path, pan_dir, sem_dir = _outputs(out, name)
        pan_dir.mkdir(parents=True, exist_ok=True)
        sem_dir.mkdir(parents=True, exist_ok=True)
        jobs = [_Job(rec, split.json_path, categories, pan_dir / f"{rec.stem}.png", sem_dir / f"{rec.stem}.png")
                for rec in split.records if rec.panoptic_path is not None]
        results = list(parallel_map(_convert_one, jobs, workers, f"COCO-Objects {name}", progress))
        save_json(json_path, {"images": [r["image"] for r in results],
                              "annotations": [r["annotation"] for r in results],
                              "categories": [c.to_dict() for c in categories.categories]})
        spec = info.splits[name]
        specs[name] = SplitSpec(relative_to(info.root / spec.image_dir, out), relative_to(json_path, out),
                                relative_to(pan_dir, out), relative_to(sem_dir, out))
    part_dir = Path(partitions) if partitions is not None else info.partitions_dir
    parts = None if part_dir is None else relative_to(part_dir, out)
    vocabulary = "coco_objects" if categories is not None and vocabulary_matches(categories, "coco_objects") else None
    write_dataset_yaml(out, "coco_objects", specs, classes=own_classes_file(out), partitions=parts,
                       overwrite=overwrite, vocabulary=vocabulary)
    return out
