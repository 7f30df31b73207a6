"""Pseudo-label outputs and Label Studio exports for tests, without a model or Ray.

    from _label_studio_factory import write_pseudo_labels, annotated_export
    labels = write_pseudo_labels(tmp_path / "labels", images, image_dir, categories)
    export = annotated_export(json.loads((out / "tasks.json").read_text()))
    truth = ground_truth(split, stem)  # and annotator_results(...) for an annotator who draws it

``write_pseudo_labels`` goes through the same commit and ``assemble`` the pseudo-label job uses, so the
folder is what ``dearli pseudo-label`` leaves.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
from _panoptic_factory import FakeImage

from dearli.caches.store import CacheStore
from dearli.data.coco_format import id2rgb
from dearli.data.panoptic import CategoryMap
from dearli.data.writing import mask_area_bbox
from dearli.predict.outputs import KIND, PANOPTIC_DIR, ROW_SCHEMA, assemble

CHECKPOINT_SHA = "0123456789abcdef" * 4


def _png(path: Path, segment_map: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(id2rgb(segment_map)).save(path)


def write_pseudo_labels(out: Path, images: list[FakeImage], image_dir: Path, categories: list[dict],
                        seed: int = 0) -> Path:
    """A pseudo-label output of ``images`` (their segment maps and classes; random scores), naming the image
    files ``image_dir/<stem>.jpg``."""
    cats = CategoryMap.from_dicts(categories, "classes")
    store = CacheStore(str(out))
    store.open_for_writing(KIND, {"checkpoint_sha256": CHECKPOINT_SHA, "classes": categories})
    store.take_lease("run-1")
    (out / PANOPTIC_DIR).mkdir()
    rng = np.random.default_rng(seed)
    rows = []
    for image in images:
        _png(out / PANOPTIC_DIR / f"{image.stem}.png", image.segment_map)
        segments = []
        for seg_id, (category_id, _) in image.segments.items():
            area, bbox = mask_area_bbox(image.segment_map == seg_id)
            category = cats.category(category_id)
            segments.append({"id": seg_id, "category_id": category_id, "category_name": category.name,
                             "isthing": category.isthing, "score": float(rng.uniform(0.3, 1.0)), "area": area,
                             "bbox": [float(v) for v in bbox]})
        height, width = image.segment_map.shape
        rows.append({"image_id": image.stem, "stem": image.stem, "image_path": str(image_dir / f"{image.stem}.jpg"),
                     "height": height, "width": width, "file_name": f"{image.stem}.png", "segments": segments})
    store.commit(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), "run-1")
    assemble(str(out), cats, "run-1")
    return out


def annotated_export(tasks: list[dict], start_id: int = 100) -> list[dict]:
    """Label Studio's JSON export of ``tasks`` after an annotator accepted every prediction unchanged."""
    exported = []
    for k, task in enumerate(tasks):
        result = json.loads(json.dumps(task["predictions"][0]["result"]))
        for region in result:
            region.pop("score", None)
        annotation = {"id": start_id + k, "result": result, "was_cancelled": False,
                      "created_at": "2024-05-01T10:00:00.000000Z", "updated_at": "2024-05-01T10:00:00.000000Z"}
        exported.append({"id": k + 1, "data": task["data"], "annotations": [annotation],
                         "predictions": task["predictions"]})
    return exported


def drop_annotations(json_path: Path, stems: set[str]) -> None:
    """Remove the annotations of ``stems`` from a panoptic JSON (their images stay: an unlabeled pool)."""
    data = json.loads(json_path.read_text())
    ids = {str(i["id"]) for i in data["images"] if Path(i["file_name"]).stem in stems}
    data["annotations"] = [a for a in data["annotations"] if str(a["image_id"]) not in ids]
    json_path.write_text(json.dumps(data))


def ground_truth(split, stem: str) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """The annotation of ``stem`` in a PanopticSplit: its segment map and (segment id, category id, iscrowd)."""
    from dearli.data.panoptic import read_segment_map

    record = split.record(stem)
    return (read_segment_map(record, split.json_path),
            [(s.id, s.category_id, int(s.iscrowd)) for s in record.segments_info])


def canonical(segment_map: np.ndarray, segments: list[tuple[int, ...]]) -> list[tuple[int, int, bytes]]:
    """An annotation without its segment ids and order: sorted (category id, iscrowd, mask bytes), to compare
    two. ``segments``: (segment id, category id[, iscrowd]) tuples, iscrowd 0 when left out."""
    return sorted((entry[1], entry[2] if len(entry) > 2 else 0, np.packbits(segment_map == entry[0]).tobytes())
                  for entry in segments)


def annotator_results(items: dict[str, tuple[np.ndarray, list[tuple[int, int, int]]]], categories: CategoryMap,
                      encode) -> dict[str, list[dict]]:
    """What an annotator who draws the ground truth submits: per stem, one brush region per segment of its
    annotation (``items``: stem -> :func:`ground_truth`), labelled with the class's display name, and for a
    crowd segment the per-region "crowd" choice; ``encode`` turns a list of masks into their brush RLEs (e.g.
    the SDK's, ``_label_studio.brush_rles``)."""
    masks, where = [], []
    for stem, (segment_map, segments) in items.items():
        for seg_id, category_id, iscrowd in segments:
            masks.append(segment_map == seg_id)
            where.append((stem, seg_id, category_id, iscrowd, segment_map.shape))
    results: dict[str, list[dict]] = {stem: [] for stem in items}
    for (stem, seg_id, category_id, iscrowd, (height, width)), rle in zip(where, encode(masks)):
        size = {"original_width": width, "original_height": height, "image_rotation": 0}
        results[stem].append({
            "id": f"gt{seg_id}", "from_name": "label", "to_name": "image", "type": "brushlabels", **size,
            "value": {"format": "rle", "rle": rle, "brushlabels": [categories.category(category_id).name]}})
        if iscrowd:
            results[stem].append({"id": f"gt{seg_id}", "from_name": "crowd", "to_name": "image", "type": "choices",
                                  **size, "value": {"choices": ["crowd"]}})
    return results
