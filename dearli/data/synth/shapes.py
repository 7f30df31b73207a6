"""Pure rasterisation helpers: each returns an H×W bool mask of one shape (no randomness in here).

A shape lives in normalised local coordinates (u, v): the image plane is translated to the centre,
rotated by ``angle`` and divided by ``radius`` (and by ``aspect`` along v), so every outline below is
written once for a unit-sized shape. Only the window around the shape is evaluated, which keeps a
128×128 scene at a few hundred microseconds.
"""

from __future__ import annotations

import math

import numpy as np

# Shapes the thing classes are drawn with (classes.py names them by these keys).
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "ring", "bar")

# Half side of the square relative to the radius: keeps its area close to the circle's.
_SQUARE_HALF = 0.85
_STAR_INNER = 0.45  # inner/outer radius ratio of the five-pointed star
_CROSS_ARM = 0.34  # half width of a cross arm
_RING_INNER = 0.55  # hole radius of a ring; the hole shows whatever lies behind
_BAR_HALF_WIDTH = 0.14  # bars are thin: at radius 20 px they are ~6 px wide
_TRIANGLE_SCALE = 1.25  # the inscribed triangle is small; enlarge it to a comparable area
_STAR_SCALE = 1.2


def _regular_polygon(num: int, scale: float, inner: float | None = None) -> np.ndarray:
    """Vertices (num or 2·num)×2 as (u, v) of a regular polygon (or star when ``inner`` is given),
    first vertex pointing up (negative v, image rows grow downwards)."""
    count = num if inner is None else 2 * num
    verts = []
    for k in range(count):
        theta = -math.pi / 2 + 2 * math.pi * k / count
        rad = scale if (inner is None or k % 2 == 0) else scale * inner
        verts.append((rad * math.cos(theta), rad * math.sin(theta)))
    return np.array(verts, dtype=np.float64)


_TRIANGLE = _regular_polygon(3, _TRIANGLE_SCALE)
_STAR = _regular_polygon(5, _STAR_SCALE, _STAR_INNER)


def polygon_inside(u: np.ndarray, v: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test.

    Args:
        u, v: arrays of the same shape with point coordinates.
        verts: K×2 polygon vertices (u, v), in order.
    Returns:
        bool array shaped like ``u``.
    """
    inside = np.zeros(u.shape, dtype=bool)
    for k in range(len(verts)):
        (u1, v1), (u2, v2) = verts[k], verts[(k + 1) % len(verts)]
        if v1 == v2:  # a horizontal edge is never crossed by a horizontal ray
            continue
        crosses = (v1 > v) != (v2 > v)
        u_cross = u1 + (v - v1) * (u2 - u1) / (v2 - v1)
        inside ^= crosses & (u < u_cross)
    return inside


def _unit_shape(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of the unit-sized ``shape`` at local coordinates (u, v)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= _RING_INNER**2)
    if shape == "square":
        return (np.abs(u) <= _SQUARE_HALF) & (np.abs(v) <= _SQUARE_HALF)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.1
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= _CROSS_ARM) & (av <= 1.0)) | ((av <= _CROSS_ARM) & (au <= 1.0))
    if shape == "bar":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= _BAR_HALF_WIDTH)
    if shape == "triangle":
        return polygon_inside(u, v, _TRIANGLE)
    if shape == "star":
        return polygon_inside(u, v, _STAR)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _window(size: tuple[int, int], cy: float, cx: float, extent: float) -> tuple[slice, slice] | None:
    """Row/column slices of the square of half side ``extent`` around (cy, cx), clipped; None if empty."""
    height, width = size
    y0, y1 = max(0, int(math.floor(cy - extent))), min(height, int(math.ceil(cy + extent)) + 1)
    x0, x1 = max(0, int(math.floor(cx - extent))), min(width, int(math.ceil(cx + extent)) + 1)
    if y0 >= y1 or x0 >= x1:
        return None
    return slice(y0, y1), slice(x0, x1)


def shape_mask(shape: str, size: tuple[int, int], cy: float, cx: float, radius: float,
               angle: float = 0.0, aspect: float = 1.0) -> np.ndarray:
    """Rasterise one shape.

    Args:
        shape: one of SHAPES.
        size: (H, W) of the image.
        cy, cx: centre in pixels (row, column); pixel (i, j) is sampled at its centre (i + 0.5, j + 0.5).
        radius: half extent in pixels (circumradius for polygons).
        angle: rotation in radians, counter-clockwise on screen.
        aspect: stretch along the shape's local v axis (1 = undistorted).
    Returns:
        H×W bool mask.
    """
    out = np.zeros(size, dtype=bool)
    window = _window(size, cy, cx, radius * max(1.0, aspect) * _TRIANGLE_SCALE * 1.1 + 1)
    if window is None or radius <= 0:
        return out
    rows, cols = window
    dy = (np.arange(rows.start, rows.stop, dtype=np.float64) + 0.5 - cy)[:, None]
    dx = (np.arange(cols.start, cols.stop, dtype=np.float64) + 0.5 - cx)[None, :]
    cos, sin = math.cos(angle), math.sin(angle)
    u = (dx * cos - dy * sin) / radius
    v = (dx * sin + dy * cos) / (radius * aspect)
    out[rows, cols] = _unit_shape(shape, u, v)
    return out


def ellipse_mask(size: tuple[int, int], cy: float, cx: float, ry: float, rx: float,
                 angle: float = 0.0) -> np.ndarray:
    """H×W bool mask of a rotated ellipse with semi-axes ``ry`` (local rows) and ``rx`` (local columns)."""
    if rx <= 0 or ry <= 0:
        return np.zeros(size, dtype=bool)
    return shape_mask("circle", size, cy, cx, rx, angle, aspect=ry / rx)


def bbox_xywh(mask: np.ndarray) -> list[int]:
    """COCO bbox [x, y, w, h] (integers, pixel units) of the True pixels of an H×W mask; zeros if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return [0, 0, 0, 0]
    cols = np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
