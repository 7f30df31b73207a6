"""Minimal pairs: two copies of one pretrain scene, each with one new object painted at the same place.

The two objects belong to classes that share their colour (red circle / red triangle) or, when the
shape has several colours, their shape (red circle / green circle). Everything else in the two images
is identical, so in a batch holding both, the contrastive loss can only match each image to its caption
by the attribute that differs: the cheap shortcut of whole scenes (colour and texture statistics name a
scene well enough) is closed. The first class of a pair is uniform over the thing classes, so the long
tail is seen as often as the head.

The object is drawn like the world draws things (same outlines, colour jitter, shading, photometric gain
and pixel noise), into the finished scene image.
"""

from __future__ import annotations

import math

import numpy as np

from dearli.data.synth.classes import THING_CLASSES, SynthClass
from dearli.data.synth.scene import PIXEL_NOISE, THING_RADIUS_RANGE, Canvas, _fill, _thing_colour
from dearli.data.synth.shapes import bbox_xywh, shape_mask
from dearli.data.synth.world import SynthSample

GAIN_RANGE, OFFSET_RANGE = (0.85, 1.15), (-12.0, 12.0)  # the scene-wide photometric change compose() applies


def _colour_word(cls: SynthClass) -> str:
    return cls.name.split()[0]


def contrast_class(rng: np.random.Generator, first: SynthClass) -> SynthClass:
    """A thing class differing from ``first`` in exactly one attribute: shape (same colour) or colour."""
    same_colour = [c for c in THING_CLASSES if _colour_word(c) == _colour_word(first) and c.kind != first.kind]
    same_shape = [c for c in THING_CLASSES if c.kind == first.kind and c.id != first.id]
    pool = same_shape if same_shape and (not same_colour or rng.random() < 0.5) else same_colour
    return pool[int(rng.integers(len(pool)))]


def _geometry(rng: np.random.Generator, size: tuple[int, int]) -> dict:
    """Centre, radius, angle and aspect of the new object (the world's size distribution)."""
    low, high = THING_RADIUS_RANGE
    radius = min(size) * math.exp(rng.uniform(math.log(low), math.log(high)))
    return {"cy": rng.uniform(0.15, 0.85) * size[0], "cx": rng.uniform(0.15, 0.85) * size[1], "radius": radius,
            "angle": rng.uniform(0, 2 * np.pi), "aspect": rng.uniform(0.85, 1.15), "bar_aspect": rng.uniform(0.7, 1.6)}


def paint_object(sample: SynthSample, cls: SynthClass, geometry: dict, seed: list[int]
                 ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Paint an instance of ``cls`` into a copy of the scene.

    Returns (image H×W×3 uint8, segment map H×W int32, segments with the new one last). The colour,
    shading and noise come from ``seed`` alone, so two calls with the same seed and geometry differ only
    in the class drawn.
    """
    rng = np.random.default_rng(seed)
    radius, aspect = geometry["radius"], geometry["aspect"]
    if cls.kind == "bar":  # as the world draws bars: longer, with a wider range of aspects
        radius, aspect = radius * 1.5, geometry["bar_aspect"]
    size = sample.segment_map.shape
    mask = shape_mask(cls.kind, size, geometry["cy"], geometry["cx"], radius, geometry["angle"], aspect)
    canvas = Canvas(sample.image.astype(np.float32), sample.segment_map.copy())
    patch = Canvas(np.zeros(size + (3,), dtype=np.float32), canvas.ids)
    _fill(rng, patch, mask, _thing_colour(rng, cls), (geometry["cy"], geometry["cx"]), radius)
    colour = patch.image[mask] * np.float32(rng.uniform(*GAIN_RANGE)) + np.float32(rng.uniform(*OFFSET_RANGE))
    colour += rng.normal(0.0, PIXEL_NOISE, size=colour.shape).astype(np.float32)
    canvas.image[mask] = colour
    new_id = len(sample.segments) + 1
    canvas.ids[mask] = new_id
    segments = [dict(s) for s in sample.segments]
    segments.append({"id": new_id, "category_id": cls.id, "iscrowd": 0, "area": int(mask.sum()),
                     "bbox": bbox_xywh(mask)})
    image = np.clip(np.rint(canvas.image), 0, 255).astype(np.uint8)
    return image, canvas.ids, segments


def minimal_pair(rng: np.random.Generator, sample: SynthSample, seed: list[int]
                 ) -> list[tuple[np.ndarray, np.ndarray, list[dict]]]:
    """Two painted copies of ``sample`` (see :func:`paint_object`): a uniform class and its contrast."""
    first = THING_CLASSES[int(rng.integers(len(THING_CLASSES)))]
    second = contrast_class(rng, first)
    geometry = _geometry(rng, sample.segment_map.shape)
    return [paint_object(sample, cls, geometry, seed) for cls in (first, second)]
