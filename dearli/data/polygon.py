"""Masks as polygons and back, in pixel-edge coordinates: (x, y) with the image spanning [0, W] × [0, H].

A mask becomes the outer boundaries of its parts (the polygons annotation tools draw); a pixel belongs to a
polygon when its centre lies inside. The boundaries pass between pixel centres (marching squares at level
0.5, diagonal neighbours joined) and are simplified by at most ``TOLERANCE`` pixels, so no pixel centre
changes side: a mask without holes comes back exactly. What a polygon cannot say is lost: holes are
filled, and a part becomes its own polygon.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage import draw, measure

TOLERANCE = 0.3  # pixels; pixel centres lie at least 0.35 pixels from the traced boundary


def signed_area(points: np.ndarray) -> float:
    """Shoelace area of a K×2 polygon (x, y); positive when the points turn clockwise on screen."""
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def mask_polygons(mask: np.ndarray, tolerance: float = TOLERANCE) -> list[np.ndarray]:
    """Outer boundaries of the parts of an H×W bool mask: K×2 float arrays (x, y) in pixel-edge coordinates,
    not closed (the last point is not the first again), largest area first. Holes are filled."""
    filled = ndimage.binary_fill_holes(np.asarray(mask, bool))
    padded = np.pad(filled, 1).astype(np.uint8)
    polygons = []
    for contour in measure.find_contours(padded, 0.5, fully_connected="high"):
        contour = measure.approximate_polygon(contour, tolerance)[:-1]  # rows, cols of the padded array
        if len(contour) >= 3:
            # padded index -> pixel index (-1) -> pixel edge coordinates (+0.5)
            polygons.append(np.stack([contour[:, 1] - 0.5, contour[:, 0] - 0.5], axis=1))
    return sorted(polygons, key=lambda p: -abs(signed_area(p)))


def polygon_mask(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """H×W bool mask of the pixels whose centre lies inside a K×2 polygon (x, y) in pixel-edge coordinates."""
    points = np.asarray(points, float)
    mask = np.zeros((height, width), bool)
    rows, cols = draw.polygon(points[:, 1] - 0.5, points[:, 0] - 0.5, (height, width))
    mask[rows, cols] = True
    return mask
