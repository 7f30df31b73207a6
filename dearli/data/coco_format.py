"""COCO panoptic PNG encoding: segment id = R + 256·G + 256²·B, 0 = VOID.

This is the one home of the colour <-> id conversion used by readers, writers and evaluation.
"""

from __future__ import annotations

import numpy as np

VOID_ID = 0  # segment id of unlabeled pixels in a panoptic PNG
IGNORE_LABEL = 255  # semantic-map value of unlabeled pixels (detectron2 convention)


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """Decode a panoptic PNG.

    Args:
        rgb: H×W×3 uint8 (or any integer type) colour image.
    Returns:
        H×W int64 segment ids.
    """
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an H×W×3 array, got shape {rgb.shape}")
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """Encode segment ids as a panoptic PNG colour image.

    Args:
        ids: H×W integer segment ids in [0, 256³).
    Returns:
        H×W×3 uint8.
    """
    ids = np.asarray(ids)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= 256**3):
        raise ValueError("segment ids must lie in [0, 256**3)")
    # R, G, B are the first three bytes of the id as a little-endian 32-bit integer (4 bytes a pixel, no int64).
    return np.ascontiguousarray(ids.astype("<u4").view(np.uint8).reshape(*ids.shape, 4)[..., :3])
