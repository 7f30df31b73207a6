"""Row formats of the caches (Arrow schemas), mask RLE coding and image loading. No Ray here.

SAM row (one per image): ``image_id`` (string form), ``stem``, ``height``, ``width`` and, per mask,
parallel lists ``rle_counts`` (COCO compressed RLE counts as ASCII strings, size = (height, width)),
``area``, ``bbox`` (x, y, w, h), ``predicted_iou``, ``stability_score``.

CLIP row (one per image): ``image_id``, ``stem``, ``height``, ``width``, ``feature`` (raw bytes of a
C×h×w float16 array, C order: the backbone's ``clip_vis_dense``, BEFORE the CLIP head and projection, so
that mask pooling can precede ``visual_prediction`` as in FC-CLIP), ``feature_shape`` (C, h, w),
``scale`` (resized / original side), ``resized_hw`` (image size after the test-time resize) and
``padded_hw`` (after padding bottom/right to the size divisibility; the feature covers the padded image
at stride padded_h / h).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from dearli.caches.generators import MaskRecord
from dearli.errors import DataError

DEFAULT_MAX_PIXELS = 64_000_000  # larger images are recorded as failures rather than exhausting memory

_ID_COLUMNS = [("image_id", pa.string()), ("stem", pa.string()), ("height", pa.int32()), ("width", pa.int32())]
SAM_SCHEMA = pa.schema(_ID_COLUMNS + [
    ("rle_counts", pa.list_(pa.string())),
    ("area", pa.list_(pa.int64())),
    ("bbox", pa.list_(pa.list_(pa.float32(), 4))),
    ("predicted_iou", pa.list_(pa.float32())),
    ("stability_score", pa.list_(pa.float32())),
])
CLIP_SCHEMA = pa.schema(_ID_COLUMNS + [
    ("feature", pa.binary()),
    ("feature_shape", pa.list_(pa.int32(), 3)),
    ("scale", pa.float64()),
    ("resized_hw", pa.list_(pa.int32(), 2)),
    ("padded_hw", pa.list_(pa.int32(), 2)),
])
TEXT_SCHEMA = pa.schema([("class_index", pa.int32()), ("category_id", pa.int64()), ("synonym", pa.string()),
                         ("embedding", pa.list_(pa.float32()))])


def load_rgb(path: str, height: int = 0, width: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image as H×W×3 uint8 RGB; DataError if unreadable, truncated, too large or mis-sized.

    ``height``/``width`` (when > 0) are the size the annotations declare for it.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            w, h = img.size  # header only: check the size before decoding a possibly huge image
            if h * w > max_pixels:
                raise DataError(path, f"image too large ({h}×{w} = {h * w} pixels > {max_pixels})")
            array = np.array(img.convert("RGB"))
    except DataError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(path, f"cannot read image ({err})") from err
    if (height and height != h) or (width and width != w):
        raise DataError(path, f"image is {h}×{w} but the annotations say {height}×{width}")
    return array


def encode_masks(masks: np.ndarray) -> list[str]:
    """N×H×W bool -> N COCO compressed-RLE counts strings."""
    from pycocotools import mask as mask_utils

    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(np.moveaxis(masks.astype(np.uint8), 0, -1)))
    return [r["counts"].decode("ascii") for r in rles]


def decode_rles(counts: list[str], height: int, width: int) -> np.ndarray:
    """N COCO RLE counts strings of an H×W image -> N×H×W bool."""
    from pycocotools import mask as mask_utils

    if len(counts) == 0:
        return np.zeros((0, height, width), dtype=bool)
    rles = [{"size": [int(height), int(width)], "counts": c.encode("ascii")} for c in counts]
    return np.moveaxis(mask_utils.decode(rles), -1, 0).astype(bool)


def sam_row(image_id: str, stem: str, height: int, width: int, masks: list[MaskRecord]) -> dict[str, Any]:
    stack = np.stack([m.segmentation for m in masks]) if masks else np.zeros((0, height, width), bool)
    return {
        "image_id": str(image_id), "stem": stem, "height": int(height), "width": int(width),
        "rle_counts": encode_masks(stack),
        "area": [int(m.area) for m in masks],
        "bbox": [[float(v) for v in m.bbox] for m in masks],
        "predicted_iou": [float(m.predicted_iou) for m in masks],
        "stability_score": [float(m.stability_score) for m in masks],
    }


def clip_row(image_id: str, stem: str, height: int, width: int, feature: np.ndarray, scale: float,
             resized_hw: tuple[int, int], padded_hw: tuple[int, int]) -> dict[str, Any]:
    """feature: C×h×w (any float dtype; stored as float16)."""
    feature = np.ascontiguousarray(feature, dtype=np.float16)
    return {
        "image_id": str(image_id), "stem": stem, "height": int(height), "width": int(width),
        "feature": feature.tobytes(), "feature_shape": [int(s) for s in feature.shape],
        "scale": float(scale), "resized_hw": [int(s) for s in resized_hw],
        "padded_hw": [int(s) for s in padded_hw],
    }


def decode_feature(row: dict[str, Any]) -> np.ndarray:
    """A CLIP cache row -> its C×h×w float16 feature map."""
    shape = tuple(int(s) for s in row["feature_shape"])
    return np.frombuffer(row["feature"], dtype=np.float16).reshape(shape)
