"""Composition of one scene: stuff regions split by wavy horizons, then shapes painted back to front.

The painter keeps a float image and a provisional segment-id map side by side; a later layer
overwrites both, so occlusion leaves partial shapes and every pixel belongs to exactly one segment
(or to VOID: clutter objects and, in some images, thin bands along stuff boundaries). world.py turns
the result into final ids, areas, boxes and a caption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from dearli.data.coco_format import VOID_ID
from dearli.data.synth.classes import STUFF_CLASSES, THING_CLASSES, SynthClass, class_probabilities
from dearli.data.synth.shapes import ellipse_mask, shape_mask
from dearli.data.synth.textures import render_texture

# Scene statistics. Sizes are fractions of the shorter image side so any resolution looks alike.
REGION_COUNT_PROBS = (0.25, 0.45, 0.30)  # P(1, 2, 3 stuff regions)
MIN_THINGS, MAX_THINGS = 2, 8  # instances per image (inclusive)
THING_RADIUS_RANGE = (0.035, 0.19)  # log-uniform; the low end gives small instances of ~4 px radius
NEAR_PROB = 0.45  # chance an instance is placed touching/overlapping an earlier one
BOUNDARY_VOID_PROB = 0.5  # chance the stuff boundaries are left unlabeled (VOID) in an image
CLUTTER_PROB = 0.3  # chance of an "unknown" clutter object, labeled VOID
CROWD_PROB = 0.12  # chance of a crowd segment: a cluster of tiny shapes of one class, iscrowd=1
PIXEL_NOISE = 4.0  # std of the final per-pixel noise, grey levels

_THING_PROBS = class_probabilities(THING_CLASSES)
_STUFF_PROBS = class_probabilities(STUFF_CLASSES)


@dataclass
class Canvas:
    """A scene under construction.

    Attributes:
        image: H×W×3 float32 colours (unclipped).
        ids: H×W int32 provisional segment ids, VOID_ID = unlabeled.
        segments: provisional id -> (category id, iscrowd), in creation order (id = position + 1).
    """

    image: np.ndarray
    ids: np.ndarray
    segments: list[tuple[int, int]] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        return self.ids.shape

    def new_segment(self, category_id: int, iscrowd: int = 0) -> int:
        self.segments.append((category_id, iscrowd))
        return len(self.segments)


def _horizon_labels(rng: np.random.Generator, size: tuple[int, int], count: int) -> np.ndarray:
    """H×W int region index 0..count-1, top to bottom, split by wavy, slightly tilted horizons."""
    height, width = size
    rows = np.arange(height, dtype=np.float32)[:, None]
    cols = np.arange(width, dtype=np.float32)
    labels = np.zeros(size, dtype=np.int32)
    for k in range(1, count):
        level = height * (k / count + rng.uniform(-0.12, 0.12))
        amplitude = height * rng.uniform(0.01, 0.08)
        waves = rng.uniform(0.5, 3.0)
        slope = rng.uniform(-0.3, 0.3)
        curve = (level + amplitude * np.sin(2 * np.pi * waves * cols / width + rng.uniform(0, 2 * np.pi))
                 + slope * (cols - width / 2))
        labels += (rows >= curve[None, :]).astype(np.int32)
    return labels


def _boundary_band(labels: np.ndarray) -> np.ndarray:
    """H×W bool: pixels with a 4-neighbour of another label (a band ~2 px wide along boundaries)."""
    band = np.zeros(labels.shape, dtype=bool)
    vertical = labels[1:] != labels[:-1]
    horizontal = labels[:, 1:] != labels[:, :-1]
    band[1:] |= vertical
    band[:-1] |= vertical
    band[:, 1:] |= horizontal
    band[:, :-1] |= horizontal
    return band


def paint_stuff(rng: np.random.Generator, canvas: Canvas) -> None:
    """Fill the canvas with 1-3 stuff regions of distinct classes (sky, when drawn, on top)."""
    count = int(rng.choice(len(REGION_COUNT_PROBS), p=REGION_COUNT_PROBS)) + 1
    picks = rng.choice(len(STUFF_CLASSES), size=count, replace=False, p=_STUFF_PROBS)
    chosen = sorted((STUFF_CLASSES[i] for i in picks), key=lambda c: c.kind != "sky")
    labels = _horizon_labels(rng, canvas.size, count)
    for region, cls in enumerate(chosen):
        mask = labels == region
        texture = render_texture(cls.kind, rng, canvas.size, cls.rgb)
        canvas.image[mask] = texture[mask]
        canvas.ids[mask] = canvas.new_segment(cls.id)
    if count > 1 and rng.random() < BOUNDARY_VOID_PROB:
        canvas.ids[_boundary_band(labels)] = VOID_ID


def _fill(rng: np.random.Generator, canvas: Canvas, mask: np.ndarray, rgb: np.ndarray,
          centre: tuple[float, float], radius: float) -> None:
    """Colour the mask pixels with ``rgb`` under a random linear shading (a lit side and a dark side)."""
    ys, xs = np.nonzero(mask)
    theta = rng.uniform(0, 2 * np.pi)
    ramp = ((xs - centre[1]) * math.cos(theta) + (ys - centre[0]) * math.sin(theta)) / max(radius, 1.0)
    shade = 1.0 + rng.uniform(0.05, 0.2) * np.clip(ramp, -1.0, 1.0)
    canvas.image[ys, xs] = rgb[None, :] * shade[:, None].astype(np.float32)


def _thing_colour(rng: np.random.Generator, cls: SynthClass) -> np.ndarray:
    return np.asarray(cls.rgb, dtype=np.float32) + rng.uniform(-22, 22, 3).astype(np.float32)


def _place(rng: np.random.Generator, size: tuple[int, int], radius: float,
           placed: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Centre of a new instance: near an earlier one (touching/overlapping) or anywhere, edges included."""
    height, width = size
    if placed and rng.random() < NEAR_PROB:
        cy, cx, other = placed[int(rng.integers(len(placed)))]
        direction = rng.uniform(0, 2 * np.pi)
        distance = (other + radius) * rng.uniform(0.45, 1.05)
        return cy + distance * math.sin(direction), cx + distance * math.cos(direction)
    return rng.uniform(0.03, 0.97) * height, rng.uniform(0.03, 0.97) * width


def paint_thing(rng: np.random.Generator, canvas: Canvas, cls: SynthClass,
                placed: list[tuple[float, float, float]]) -> None:
    """Paint one instance of thing class ``cls`` over the canvas and record it as a segment."""
    side = min(canvas.size)
    low, high = THING_RADIUS_RANGE
    radius = side * math.exp(rng.uniform(math.log(low), math.log(high)))
    if cls.kind == "bar":
        radius *= 1.5  # bars are long and thin, so give them length
        aspect = rng.uniform(0.7, 1.6)
    else:
        aspect = rng.uniform(0.85, 1.15)
    cy, cx = _place(rng, canvas.size, radius, placed)
    mask = shape_mask(cls.kind, canvas.size, cy, cx, radius, rng.uniform(0, 2 * np.pi), aspect)
    placed.append((cy, cx, radius))
    _fill(rng, canvas, mask, _thing_colour(rng, cls), (cy, cx), radius)
    canvas.ids[mask] = canvas.new_segment(cls.id)


def paint_crowd(rng: np.random.Generator, canvas: Canvas, cls: SynthClass) -> None:
    """Paint a cluster of tiny shapes of one class, annotated as a single iscrowd=1 segment."""
    side = min(canvas.size)
    cy, cx = rng.uniform(0.15, 0.85) * canvas.size[0], rng.uniform(0.15, 0.85) * canvas.size[1]
    spread = side * rng.uniform(0.07, 0.13)
    union = np.zeros(canvas.size, dtype=bool)
    rgb = _thing_colour(rng, cls)
    for _ in range(int(rng.integers(6, 15))):
        radius = side * rng.uniform(0.018, 0.032)
        py, px = cy + rng.normal(0, spread), cx + rng.normal(0, spread)
        mask = shape_mask(cls.kind, canvas.size, py, px, radius, rng.uniform(0, 2 * np.pi))
        _fill(rng, canvas, mask, rgb, (py, px), radius)
        union |= mask
    canvas.ids[union] = canvas.new_segment(cls.id, iscrowd=1)


def paint_clutter(rng: np.random.Generator, canvas: Canvas) -> None:
    """Paint an irregular dull blob of no known class; its pixels are VOID."""
    side = min(canvas.size)
    cy, cx = rng.uniform(0.1, 0.9) * canvas.size[0], rng.uniform(0.1, 0.9) * canvas.size[1]
    blob = np.zeros(canvas.size, dtype=bool)
    for _ in range(int(rng.integers(3, 6))):
        r = side * rng.uniform(0.025, 0.07)
        oy, ox = rng.normal(0, r), rng.normal(0, r)
        blob |= ellipse_mask(canvas.size, cy + oy, cx + ox, r * rng.uniform(0.5, 1.0), r,
                             rng.uniform(0, np.pi))
    # Dull, desaturated colours that none of the classes uses.
    grey = rng.uniform(35, 110)
    rgb = np.float32(grey) + rng.uniform(-12, 12, 3).astype(np.float32)
    _fill(rng, canvas, blob, rgb, (cy, cx), side * 0.1)
    canvas.ids[blob] = VOID_ID


def compose(rng: np.random.Generator, size: tuple[int, int]) -> Canvas:
    """Draw a full scene: stuff, then things, an optional crowd and an optional clutter object in a
    random depth order, then global photometric noise. Returns the Canvas (image still float)."""
    canvas = Canvas(np.zeros(size + (3,), dtype=np.float32), np.zeros(size, dtype=np.int32))
    paint_stuff(rng, canvas)
    num_things = int(rng.integers(MIN_THINGS, MAX_THINGS + 1))
    layers: list[tuple[str, int]] = [
        ("thing", int(i)) for i in rng.choice(len(THING_CLASSES), size=num_things, p=_THING_PROBS)]
    if rng.random() < CROWD_PROB:
        crowd_class = int(rng.choice(len(THING_CLASSES), p=_THING_PROBS))
        layers.insert(int(rng.integers(len(layers) + 1)), ("crowd", crowd_class))
    if rng.random() < CLUTTER_PROB:
        layers.insert(int(rng.integers(len(layers) + 1)), ("clutter", -1))
    placed: list[tuple[float, float, float]] = []
    for kind, index in layers:
        if kind == "thing":
            paint_thing(rng, canvas, THING_CLASSES[index], placed)
        elif kind == "crowd":
            paint_crowd(rng, canvas, THING_CLASSES[index])
        else:
            paint_clutter(rng, canvas)
    gain = rng.uniform(0.85, 1.15)
    offset = rng.uniform(-12, 12)
    canvas.image = canvas.image * np.float32(gain) + np.float32(offset)
    canvas.image += rng.normal(0.0, PIXEL_NOISE, size=canvas.image.shape).astype(np.float32)
    return canvas
