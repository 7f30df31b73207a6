"""Reading COCO panoptic annotation sets for evaluation: JSON files, PNG files, segment-id tables.

The validation here follows what cocodataset/panopticapi accepts and rejects, so that a
prediction set that evaluates here also evaluates there, with every error naming its file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from dearli.data.coco_format import VOID_ID, rgb2id
from dearli.errors import DataError

_ID_MASK = np.uint32(0xFFFFFF)  # a panoptic id has 24 bits: R + 256·G + 256²·B
_NOT_AN_ID = np.uint32(0xFFFFFFFF)  # never equal to a 24-bit id: marks the "other" slot of an IdTable


@dataclass(frozen=True)
class ImageTask:
    """One GT/prediction pair to evaluate (plain data, so it pickles cheaply to worker processes)."""

    image_id: Any
    gt_png: str
    gt_segments: list[dict]
    pred_png: str
    pred_segments: list[dict]


def load_json(source: str | Path | Mapping, what: str) -> tuple[dict, str | None]:
    """Load a COCO panoptic JSON given as a path or an already-parsed dict.

    Returns:
        (the dict, the path as a string or None when a dict was given).
    """
    if isinstance(source, Mapping):
        return dict(source), None
    path = str(source)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(path, f"{what} JSON file not found") from None
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(path, f"cannot read {what} JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataError(path, f"{what} JSON has no 'annotations' list")
    return data, path


def load_categories(gt: dict, gt_path: str | None) -> list[dict]:
    """The GT ``categories`` list, checked for the fields evaluation needs (``id``, ``isthing``)."""
    categories = gt.get("categories")
    if not isinstance(categories, list) or not categories:
        raise DataError(gt_path, "ground-truth JSON has no 'categories' list")
    for cat in categories:
        if not isinstance(cat, dict) or "id" not in cat:
            raise DataError(gt_path, f"category without an 'id': {cat!r}")
        if "isthing" not in cat:
            raise DataError(gt_path, f"category {cat['id']!r} has no 'isthing' field")
    return categories


def pair_annotations(
    gt: dict, gt_path: str | None, gt_dir: str | Path, pred: dict, pred_path: str | None, pred_dir: str | Path
) -> list[ImageTask]:
    """One task per GT annotation, in GT order, with the prediction of the same ``image_id``.

    Image ids are compared as they are (``1`` and ``"1"`` differ), as panopticapi does.
    """
    preds = {}
    for ann in pred["annotations"]:
        _check_annotation(ann, pred_path)
        preds[ann["image_id"]] = ann  # a repeated image id: the last annotation wins, as in panopticapi
    tasks = []
    for ann in gt["annotations"]:
        _check_annotation(ann, gt_path, need_area=True)
        image_id = ann["image_id"]
        if image_id not in preds:
            raise DataError(pred_path, f"no prediction for the image with id {image_id!r}")
        pred_ann = preds[image_id]
        tasks.append(ImageTask(
            image_id=image_id,
            gt_png=os.path.join(gt_dir, ann["file_name"]),
            gt_segments=ann["segments_info"],
            pred_png=os.path.join(pred_dir, pred_ann["file_name"]),
            pred_segments=pred_ann["segments_info"],
        ))
    return tasks


def _check_annotation(ann: Any, path: str | None, need_area: bool = False) -> None:
    if not isinstance(ann, dict):
        raise DataError(path, f"annotation is not an object: {ann!r:.80}")
    for key in ("image_id", "file_name", "segments_info"):
        if key not in ann:
            raise DataError(path, f"annotation of image {ann.get('image_id')!r} has no '{key}'")
    for seg in ann["segments_info"]:
        if not isinstance(seg, dict) or "id" not in seg or "category_id" not in seg:
            raise DataError(path, f"image {ann['image_id']!r}: segment without 'id'/'category_id': {seg!r:.80}")
        if need_area and "area" not in seg:  # GT areas are taken from the JSON, not counted
            raise DataError(path, f"image {ann['image_id']!r}: segment {seg['id']!r} has no 'area'")


def read_panoptic_ids(path: str, out: np.ndarray | None = None) -> np.ndarray:
    """Decode a panoptic PNG into segment ids.

    Args:
        path: the PNG file.
        out: optional flat uint32 buffer to write the ids into when it holds at least H·W elements
            (reusing memory across images avoids page-faulting a fresh array each time).
    Returns:
        H×W uint32 ids (R + 256·G + 256²·B). RGBA files use their first three channels.
    """
    try:
        with Image.open(path) as im:
            if im.mode == "RGB":
                # PIL keeps RGB as 4 bytes a pixel: exporting RGBX gives the ids as little-endian uint32
                # after masking the pad byte, without an H×W×3 intermediate.
                im.load()
                raw = np.frombuffer(im.tobytes("raw", "RGBX"), dtype="<u4")
                dest = out[:raw.size] if out is not None and out.size >= raw.size else None
                return np.bitwise_and(raw, _ID_MASK, out=dest).reshape(im.height, im.width)
            if im.mode == "RGBA":
                return rgb2id(np.asarray(im)[..., :3]).astype(np.uint32)
            mode = im.mode
    except FileNotFoundError:
        raise DataError(path, "PNG file not found") from None
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(path, f"cannot read PNG: {err}") from None
    raise DataError(path, f"expected an RGB panoptic PNG, got image mode {mode!r}")


class IdTable:
    """Maps 24-bit segment ids to compact slots 0..n (slot n = "any other id"), vectorised.

    A multiplicative hash ``(id · A mod 2³²) >> (32 − bits)`` indexes a small lookup table; a
    comparison with the stored ids catches ids outside the table. This is several times faster
    than np.unique / np.searchsorted on a full image.
    """

    def __init__(self, ids: np.ndarray):
        self.ids = np.asarray(ids, dtype=np.uint32)
        self.other = len(self.ids)
        self._stored = np.append(self.ids, _NOT_AN_ID)
        self._mult, self._shift, self._lut = _build_hash(self.ids)

    def lookup(
        self, ids: np.ndarray, slots: np.ndarray | None = None, scratch: np.ndarray | None = None,
        known: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Slots of ``ids`` (any shape, uint32).

        ``slots`` (intp), ``scratch`` (uint32) and ``known`` (bool) are optional flat buffers of at
        least ``ids.size`` elements; passing them avoids allocating three image-sized arrays.

        Returns:
            (flat intp slots with unknown ids set to ``self.other``, flat bool "id is known").
        """
        flat = ids.reshape(-1)
        n = flat.size
        slots = np.empty(n, np.intp) if slots is None else slots[:n]
        scratch = np.empty(n, np.uint32) if scratch is None else scratch[:n]
        known = np.empty(n, bool) if known is None else known[:n]
        if self._lut is None:  # no collision-free hash found: fall back to binary search
            np.minimum(np.searchsorted(self.ids, flat), self.other, out=slots)
        else:
            np.multiply(flat, self._mult, out=scratch)  # wraps modulo 2**32 by design
            np.right_shift(scratch, self._shift, out=scratch)
            self._lut.take(scratch, mode="clip", out=slots)
        self._stored.take(slots, mode="clip", out=scratch)
        np.equal(scratch, flat, out=known)
        if not known.all():
            slots[~known] = self.other
        return slots, known


_MULTIPLIERS = (np.random.default_rng(12345).integers(1, 2**32, size=8, dtype=np.uint64) | 1).astype(np.uint32)
_MAX_HASH_BITS = 16  # tables of at most 64k slots; beyond that binary search is used


def _build_hash(ids: np.ndarray) -> tuple[np.uint32, np.uint32, np.ndarray | None]:
    """Find a multiplier and table size with no collision among ``ids`` (sorted, unique).

    Starts near n² slots, where a random multiplier is collision-free about half the time, and
    tries eight fixed multipliers at once per size (fixed: the same ids always get the same table).
    """
    n = max(len(ids), 1)
    log_n = int(np.ceil(np.log2(n)))
    for bits in range(max(log_n + 2, 2 * log_n - 1), _MAX_HASH_BITS + 1):
        shift = np.uint32(32 - bits)
        h = np.sort((ids[:, None] * _MULTIPLIERS[None, :]) >> shift, axis=0)  # n × 8
        ok = ~(h[1:] == h[:-1]).any(axis=0)
        if ok.any():
            k = int(np.argmax(ok))
            lut = np.full(1 << bits, len(ids), dtype=np.intp)
            lut[(ids * _MULTIPLIERS[k]) >> shift] = np.arange(len(ids))
            return _MULTIPLIERS[k], shift, lut
    return np.uint32(1), np.uint32(0), None


def segment_table(segments: list[dict], path: str | None) -> tuple[dict, IdTable, int]:
    """Segments keyed by id (a repeated id: the last one wins, as in panopticapi) and their id table.

    The table always holds VOID (0) so VOID pixels get a slot of their own.

    Returns:
        (id -> segment dict, table over sorted ids incl. 0, slot of VOID).
    """
    by_id = {}
    for seg in segments:
        seg_id = seg["id"]
        if not isinstance(seg_id, (int, np.integer)) or isinstance(seg_id, bool) or not 0 <= seg_id <= _ID_MASK:
            raise DataError(path, f"segment id {seg_id!r} is not an integer in [0, 256**3)")
        by_id[int(seg_id)] = seg
    ids = np.array(sorted(set(by_id) | {VOID_ID}), dtype=np.uint32)
    return by_id, IdTable(ids), int(np.searchsorted(ids, VOID_ID))
