"""Plain restatements of what the package computes in a faster or fused way, for tests to compare against.

- :func:`random_resize`, :func:`random_crop`: the training augmentation's geometry step by step (resize the
  whole image and every mask, then crop and pad), which ``augment`` fuses into resizing the crop window only.
- :func:`semantic_from_panoptic`: a panoptic map's semantic map, pixel by pixel, which the evaluation
  counts on run maps instead.
- :func:`read_panoptic_ids`: a panoptic PNG's id map, pixel by pixel, as panopticapi decodes it.
- :func:`make_pair`: pair ``index`` of the CLIP pretraining stream, which ``make_batch`` slices from groups.
- :func:`expected_geometry`: the resized and padded sizes of an image in the CLIP feature cache.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dearli.data.coco_format import IGNORE_LABEL, rgb2id
from dearli.data.synth.world import SynthWorld
from dearli.model.inference import shortest_edge_size
from dearli.pretrain.pairs import GROUP_SIZE, PairOptions, make_group
from dearli.training.augment import PAD_VALUE, crop_offsets, resize_image, resize_masks


def random_resize(image: torch.Tensor, masks: torch.Tensor, short_side: int, max_size: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize so the shortest edge equals ``short_side`` (the longest capped at ``max_size``, if given).

    Args:
        image: 3×H×W uint8.
        masks: N×H×W bool.
    Returns:
        image 3×H'×W' uint8 (bilinear), masks N×H'×W' bool (pixel-centre nearest), aligned.
    """
    height, width = image.shape[-2:]
    size = shortest_edge_size(height, width, short_side, max_size if max_size is not None else 1 << 30)
    return resize_image(image, size), resize_masks(masks, size)


def random_crop(image: torch.Tensor, masks: torch.Tensor, size: int, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop a ``size``×``size`` window at a random offset, padding bottom/right where the image is smaller
    (the image with ``PAD_VALUE``, the masks with 0).

    Returns:
        image 3×S×S uint8, masks N×S×S, valid S×S bool (True on image pixels).
    """
    top, left = crop_offsets(image.shape[-2], image.shape[-1], size, generator)
    image, masks = image[:, top:top + size, left:left + size], masks[:, top:top + size, left:left + size]
    height, width = image.shape[-2:]
    valid = torch.zeros(size, size, dtype=torch.bool)
    valid[:height, :width] = True
    padding = (0, size - width, 0, size - height)
    return F.pad(image, padding, value=PAD_VALUE), F.pad(masks, padding), valid


def semantic_from_panoptic(ids: np.ndarray, segments: list[dict], class_of_category: Mapping) -> np.ndarray:
    """Semantic map of a panoptic map: each segment's pixels get its category's contiguous class.

    Crowd segments keep their class. VOID (0) and ids without a segment (or whose category is not in
    ``class_of_category``) become ``IGNORE_LABEL``; a segment listed with id 0 keeps its class, as in PQ.

    Args:
        ids: H×W segment ids. segments: the image's ``segments_info``.
    Returns:
        H×W int64 classes.
    """
    by_id = {int(s["id"]): s for s in segments}  # a repeated id: the last one wins, as in PQ
    seg_ids = np.array(sorted(by_id), dtype=np.int64)
    classes = np.array([class_of_category.get(by_id[i]["category_id"], IGNORE_LABEL) for i in seg_ids.tolist()],
                       dtype=np.int64)
    if len(seg_ids) == 0:
        return np.full(ids.shape, IGNORE_LABEL, dtype=np.int64)
    pos = np.minimum(np.searchsorted(seg_ids, ids), len(seg_ids) - 1)
    return np.where(seg_ids[pos] == ids, classes[pos], IGNORE_LABEL)


def read_panoptic_ids(path: Any) -> np.ndarray:
    """The H×W segment ids of a panoptic PNG: ``rgb2id`` of its colours (an RGBA file loses its alpha)."""
    with Image.open(path) as im:
        return rgb2id(np.asarray(im.convert("RGB")))


def make_pair(world: SynthWorld, index: int, options: PairOptions) -> tuple[torch.Tensor, str]:
    """Pair ``index`` of the stream (member ``index % 2`` of group ``index // 2``): (image 3×S×S float RGB
    in [0, 255], caption)."""
    return make_group(world, int(index) // GROUP_SIZE, options)[int(index) % GROUP_SIZE]


def expected_geometry(height: int, width: int, settings: dict[str, Any]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(resized, padded) sizes the CLIP cache uses for an H×W image (its manifest's ``settings``)."""
    resized = shortest_edge_size(height, width, settings["short_side"], settings["max_size"])
    div = settings["size_divisibility"]
    return resized, (resized[0] + (-resized[0]) % div, resized[1] + (-resized[1]) % div)
