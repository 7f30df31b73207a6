"""Tiny COCO panoptic datasets for tests, written from numpy arrays.

    from _panoptic_factory import FakeImage, write_dataset, random_image
    root = write_dataset(tmp_path, {"train": [random_image("a", rng), ...], "val": [...]})
    info = load_dataset(root)

Default categories include id 0 and non-contiguous ids, a synonym list, and both kinds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from dearli.data.coco_format import IGNORE_LABEL, id2rgb

DEFAULT_CATEGORIES = [
    {"id": 0, "name": "wall", "isthing": 0},
    {"id": 3, "name": "person,child,girl", "isthing": 1},
    {"id": 17, "name": "car", "isthing": 1},
    {"id": 92, "name": "sky", "isthing": 0},
]


@dataclass
class FakeImage:
    """One image: ``segment_map`` H×W segment ids (0 = VOID), ``segments`` id -> (category id, iscrowd)."""

    stem: str
    segment_map: np.ndarray
    segments: dict[int, tuple[int, bool]]
    image_id: int | str | None = None  # default: the stem
    pixels: np.ndarray | None = None  # H×W×3 uint8; default: derived from the segment map
    extra: dict = field(default_factory=dict)


def random_image(stem: str, rng: np.random.Generator, height: int = 24, width: int = 32,
                 categories: list[dict] = DEFAULT_CATEGORIES, image_id: int | str | None = None,
                 crowd: bool = False) -> FakeImage:
    """A stuff background split in two halves, two thing rectangles (the second a crowd if ``crowd``)
    and a VOID strip along the bottom row."""
    stuff = [c["id"] for c in categories if not c["isthing"]]
    things = [c["id"] for c in categories if c["isthing"]]
    seg = np.zeros((height, width), dtype=np.int64)
    seg[: height // 2] = 1
    seg[height // 2:] = 2
    segments = {1: (stuff[0], False), 2: (stuff[-1], False)}
    for k, seg_id in enumerate((3, 4)):
        y, x = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
        seg[y:y + height // 3, x + k:x + k + width // 3] = seg_id
        segments[seg_id] = (things[k % len(things)], crowd and k == 1)
    seg[-1] = 0
    present = set(np.unique(seg).tolist())
    segments = {k: v for k, v in segments.items() if k in present}
    return FakeImage(stem, seg, segments, image_id=image_id)


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def write_split(root: Path, split: str, images: list[FakeImage], categories: list[dict],
                semantic: bool = True) -> dict[str, str]:
    """Write images/<split>, annotations/panoptic_<split>{.json,/}, annotations/semantic_<split>/.

    Returns the split's dataset.yaml entry.
    """
    spec = {"image_dir": f"images/{split}", "panoptic_json": f"annotations/panoptic_{split}.json",
            "panoptic_dir": f"annotations/panoptic_{split}"}
    if semantic:
        spec["semantic_dir"] = f"annotations/semantic_{split}"
    for rel in (spec["image_dir"], spec["panoptic_dir"], spec.get("semantic_dir")):
        if rel:
            (root / rel).mkdir(parents=True, exist_ok=True)
    contiguous = {c["id"]: i for i, c in enumerate(sorted(categories, key=lambda c: c["id"]))}
    js_images, js_anns = [], []
    for img in images:
        h, w = img.segment_map.shape
        pixels = img.pixels if img.pixels is not None else (img.segment_map[..., None] * [40, 80, 120]) % 256
        Image.fromarray(pixels.astype(np.uint8)).save(root / spec["image_dir"] / f"{img.stem}.jpg", quality=95)
        Image.fromarray(id2rgb(img.segment_map)).save(root / spec["panoptic_dir"] / f"{img.stem}.png")
        image_id = img.stem if img.image_id is None else img.image_id
        js_images.append({"id": image_id, "file_name": f"{img.stem}.jpg", "height": h, "width": w})
        infos = []
        sem = np.full((h, w), IGNORE_LABEL, dtype=np.uint8)
        for seg_id, (cat, crowd) in img.segments.items():
            mask = img.segment_map == seg_id
            infos.append({"id": seg_id, "category_id": cat, "iscrowd": int(crowd), "area": int(mask.sum()),
                          "bbox": _bbox(mask) if mask.any() else [0, 0, 0, 0]})
            sem[mask] = contiguous.get(cat, IGNORE_LABEL)
        js_anns.append({"image_id": image_id, "file_name": f"{img.stem}.png", "segments_info": infos})
        if semantic:
            Image.fromarray(sem, mode="L").save(root / spec["semantic_dir"] / f"{img.stem}.png")
    data = {"images": js_images, "annotations": js_anns, "categories": categories}
    (root / spec["panoptic_json"]).write_text(json.dumps(data))
    return spec


def write_partition(root: Path, name: str, lines: list[str], final_newline: bool = True,
                    image_dir: str = "images/train") -> Path:
    """partitions/<name>/labeled.txt; ``lines`` are stems (expanded to 'img mask') or raw lines with a space."""
    path = root / "partitions" / name / "labeled.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [ln if " " in ln or not ln else f"{image_dir}/{ln}.jpg annotations/{ln}.png" for ln in lines]
    path.write_text("\n".join(rows) + ("\n" if final_newline else ""))
    return path


def write_dataset(root: Path, splits: dict[str, list[FakeImage]], categories: list[dict] | None = None,
                  name: str = "fake", semantic: bool = True,
                  partitions: dict[str, list[str]] | None = None) -> Path:
    """A full dataset directory with dataset.yaml; returns ``root``."""
    categories = DEFAULT_CATEGORIES if categories is None else categories
    root.mkdir(parents=True, exist_ok=True)
    doc = {"name": name, "splits": {s: write_split(root, s, imgs, categories, semantic)
                                    for s, imgs in splits.items()}}
    if partitions is not None:
        for part, stems in partitions.items():
            write_partition(root, part, stems)
        doc["partitions"] = "partitions"
    (root / "dataset.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return root


def small_dataset(root: Path, n_train: int = 4, n_val: int = 2, seed: int = 0, **kwargs) -> Path:
    """A ready-made dataset: stems train_000.. / val_000.., string image ids, a crowd in each image."""
    rng = np.random.default_rng(seed)
    splits = {"train": [random_image(f"train_{i:03d}", rng, crowd=True) for i in range(n_train)],
              "val": [random_image(f"val_{i:03d}", rng, crowd=True) for i in range(n_val)]}
    return write_dataset(root, splits, **kwargs)
