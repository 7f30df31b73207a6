"""ADE20K (ADEChallengeData2016 + the 2017 instance annotations) -> COCO panoptic, 150 categories.

Follows the rules of the panoptic preparation used by Mask2Former, so PQ numbers stay comparable:

- categories 0-149 are the SceneParsing classes (semantic PNG value - 1); the 100 classes of the
  instance challenge are the things, the other 50 are stuff;
- stuff is painted first, one segment per class present in the semantic PNG;
- then each thing instance of ``annotations_instance`` (R = instance-challenge class, 1-based;
  G = instance id, 0 = none; B unused) is painted over it, its class mapped to 0-149;
- thing-class pixels of the semantic PNG that no instance covers stay VOID;
- ``area``/``bbox`` of each segment are measured on its mask before later segments paint over it
  (stuff areas in the JSON can therefore exceed their pixel count in the PNG, as in the reference data).

One deliberate difference: a stuff segment that thing instances cover completely has no pixel left,
and is dropped from ``segments_info`` (the reference keeps it); a segment without pixels can never
be matched and would only make the PNG and the JSON disagree.

Segment ids are 1..N per image in painting order. The semantic PNG written beside the panoptic one
is the SceneParsing annotation shifted to 0-149 with 255 = unlabeled.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dearli.data.classes import ade20k_instance_to_category, load_class_names, own_classes_file
from dearli.data.coco_format import IGNORE_LABEL
from dearli.data.dataset import DATASET_FILE, SplitSpec, write_dataset_yaml
from dearli.data.writing import (
    parallel_map,
    refuse_existing,
    relative_to,
    save_json,
    save_panoptic_png,
    save_semantic_png,
)
from dearli.errors import DataError

ADE_SPLITS = {"train": "training", "val": "validation"}
NUM_ADE_CLASSES = 150


def _entry(segment_id: int, category_id: int, area: int, box: tuple[slice, slice]) -> dict[str, Any]:
    y, x = box
    return {"id": segment_id, "category_id": int(category_id), "area": int(area),
            "bbox": [int(x.start), int(y.start), int(x.stop - x.start), int(y.stop - y.start)], "iscrowd": 0}


def convert_ade20k_annotation(semantic: np.ndarray, instance: np.ndarray, thing_ids: frozenset[int],
                              instance_to_category: dict[int, int],
                              source: str | Path = "annotations_instance") -> tuple[np.ndarray, list[dict]]:
    """Combine one semantic and one instance annotation into a panoptic one.

    Args:
        semantic: H×W uint8 SceneParsing labels (0 = unlabeled, 1..150).
        instance: H×W×C uint8 instance annotation (R = instance class 1..100, G = instance id).
        thing_ids: category ids (0-149) that are things.
        instance_to_category: instance class -> category id.
        source: named in errors.
    Returns:
        H×W int64 segment map (0 = VOID) and the ``segments_info`` list.
    """
    from scipy import ndimage

    if int(semantic.max(initial=0)) > NUM_ADE_CLASSES:
        raise DataError(source, f"semantic label {int(semantic.max())} is outside 0..{NUM_ADE_CLASSES}")
    segments: list[dict[str, Any]] = []
    # Stuff: one segment per class, measured on the whole class mask (label value v = category v - 1).
    lut = np.zeros(NUM_ADE_CLASSES + 1, dtype=np.int64)
    counts = np.bincount(semantic.ravel(), minlength=NUM_ADE_CLASSES + 1)
    boxes = ndimage.find_objects(semantic)
    for value in np.flatnonzero(counts[1:]) + 1:
        if int(value) - 1 in thing_ids:
            continue  # thing pixels come from the instance annotation only
        lut[value] = len(segments) + 1
        segments.append(_entry(len(segments) + 1, value - 1, counts[value], boxes[value - 1]))
    segment_map = lut[semantic]
    # Things: one segment per instance id, painted over the stuff where the annotations overlap.
    classes, instance_ids = instance[..., 0].astype(np.int64), instance[..., 1]
    labelled = instance_ids > 0
    pairs = np.unique(instance_ids[labelled].astype(np.int64) * 256 + classes[labelled])
    ids, counts = np.unique(pairs // 256, return_counts=True)
    boxes = ndimage.find_objects(instance_ids)
    areas = np.bincount(instance_ids.ravel(), minlength=256)
    lut = np.zeros(256, dtype=np.int64)
    for inst, n_classes in zip(ids.tolist(), counts.tolist()):
        found = (pairs[pairs // 256 == inst] % 256).tolist()
        if n_classes != 1 or found[0] not in instance_to_category:
            raise DataError(source, f"instance {inst} has class value(s) {found} in the R channel; expected "
                                    "one instance-challenge class 1..100")
        lut[inst] = len(segments) + 1
        segments.append(_entry(len(segments) + 1, instance_to_category[found[0]], areas[inst], boxes[inst - 1]))
    segment_map = np.where(labelled, lut[instance_ids], segment_map)
    pixels = np.bincount(segment_map.ravel(), minlength=len(segments) + 1)
    return segment_map, [s for s in segments if pixels[s["id"]] > 0]


@dataclass(frozen=True)
class _Job:
    image: Path
    semantic: Path
    instance: Path
    panoptic_out: Path
    semantic_out: Path


def _read_png(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(path, f"{what} not found")
    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img)
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(path, f"cannot read {what}: {err}") from None


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            return img.size  # (width, height) from the header only
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(path, f"cannot read image: {err}") from None


@functools.lru_cache(maxsize=1)
def _ade_tables() -> tuple[frozenset[int], dict[int, int]]:
    thing_ids = frozenset(c.id for c in load_class_names("ade20k_150") if c.isthing)
    return thing_ids, ade20k_instance_to_category()


def _convert_one(job: _Job) -> dict[str, Any]:
    """Convert one image; returns its ``images`` and ``annotations`` JSON entries."""
    width, height = _image_size(job.image)
    semantic = _read_png(job.semantic, "semantic annotation")
    instance = _read_png(job.instance, "instance annotation (from annotations_instance.tar)")
    for path, array in ((job.semantic, semantic), (job.instance, instance)):
        if array.shape[:2] != (height, width) or array.dtype != np.uint8:
            raise DataError(path, f"expected {width}x{height} 8-bit, got shape {array.shape} {array.dtype} "
                                  f"(image {job.image.name})")
    if semantic.ndim != 2 or instance.ndim != 3 or instance.shape[2] < 2:
        raise DataError(job.instance, "expected a single-channel semantic PNG and an RGB instance PNG")
    thing_ids, instance_to_category = _ade_tables()
    segment_map, segments = convert_ade20k_annotation(semantic, instance, thing_ids, instance_to_category,
                                                      job.instance)
    save_panoptic_png(job.panoptic_out, segment_map)
    save_semantic_png(job.semantic_out, np.where(semantic == 0, IGNORE_LABEL, semantic.astype(np.int64) - 1))
    stem = job.image.stem
    return {"image": {"id": stem, "file_name": job.image.name, "height": height, "width": width},
            "annotation": {"image_id": stem, "file_name": job.panoptic_out.name, "segments_info": segments}}


def _outputs(out: Path, split: str) -> tuple[Path, Path, Path]:
    return (out / f"ade20k_panoptic_{split}.json", out / f"ade20k_panoptic_{split}",
            out / f"ade20k_semantic_{split}")


def prepare_ade20k(root: str | Path, out: str | Path | None = None, overwrite: bool = False,
                   partitions: str | Path | None = None, workers: int = 1, progress: bool = True) -> Path:
    """Convert ``root`` (ADEChallengeData2016 with ``annotations_instance``) and write ``out/dataset.yaml``.

    ``out`` defaults to ``root``. Existing outputs are never replaced unless ``overwrite``. The classes are
    named by the shipped ``ade20k_150`` vocabulary, or by ``out/classes.json`` if the user put one there.
    Returns the output directory.
    """
    root = Path(root)
    out = root if out is None else Path(out)
    for sub in ("images", "annotations", "annotations_instance"):
        if not (root / sub).is_dir():
            hint = " (download annotations_instance.tar of the 2017 challenge)" if "instance" in sub else ""
            raise DataError(root / sub, f"not found: {root} is not an ADEChallengeData2016 directory{hint}")
    planned = [out / DATASET_FILE] + [p for s in ADE_SPLITS for p in _outputs(out, s)]
    refuse_existing(planned, overwrite)
    specs: dict[str, SplitSpec] = {}
    categories = [c.to_dict() for c in load_class_names("ade20k_150")]
    for split, folder in ADE_SPLITS.items():
        json_path, pan_dir, sem_dir = _outputs(out, split)
        images = sorted((root / "images" / folder).glob("*.jpg"))
        if not images:
            raise DataError(root / "images" / folder, "no .jpg images found")
        pan_dir.mkdir(parents=True, exist_ok=True)
        sem_dir.mkdir(parents=True, exist_ok=True)
        jobs = [_Job(img, root / "annotations" / folder / f"{img.stem}.png",
                     root / "annotations_instance" / folder / f"{img.stem}.png",
                     pan_dir / f"{img.stem}.png", sem_dir / f"{img.stem}.png") for img in images]
        results = list(parallel_map(_convert_one, jobs, workers, f"ADE20K {split}", progress))
        save_json(json_path, {"images": [r["image"] for r in results],
                              "annotations": [r["annotation"] for r in results], "categories": categories})
        specs[split] = SplitSpec(relative_to(root / "images" / folder, out), json_path.name, pan_dir.name,
                                 sem_dir.name)
    parts = None if partitions is None else relative_to(Path(partitions), out)
    write_dataset_yaml(out, "ade20k", specs, classes=own_classes_file(out), partitions=parts, overwrite=overwrite,
                       vocabulary="ade20k_150")
    return out
