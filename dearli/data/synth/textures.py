"""Procedural textures of the stuff classes (numpy only).

Each renderer fills a whole H×W×3 float32 canvas (values ~0..255) from a numpy Generator and the
class's reference colour; the scene keeps the pixels of its region. Feature sizes scale with the image
so a 256×256 world looks like an upsampled 128×128 one. Textures are randomised per image (colour,
scale, phase) so a region is recognised by its pattern, not by one exact colour.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

TextureFn = Callable[[np.random.Generator, tuple[int, int], np.ndarray], np.ndarray]

_REFERENCE_SIDE = 128.0  # feature sizes below are in pixels of a 128-pixel image


def smooth_noise(rng: np.random.Generator, size: tuple[int, int], cells: tuple[float, float]) -> np.ndarray:
    """Value noise: a random (cells+1) grid bilinearly upsampled to ``size``.

    Args:
        size: (H, W).
        cells: number of noise cells along rows and columns (larger = finer).
    Returns:
        H×W float32 in [0, 1).
    """
    height, width = size
    cy, cx = max(1, int(round(cells[0]))), max(1, int(round(cells[1])))
    grid = rng.random((cy + 1, cx + 1), dtype=np.float32)
    ys = np.linspace(0.0, cy, height, endpoint=False, dtype=np.float32)
    xs = np.linspace(0.0, cx, width, endpoint=False, dtype=np.float32)
    y0, x0 = ys.astype(np.int64), xs.astype(np.int64)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _scale(size: tuple[int, int]) -> float:
    return min(size) / _REFERENCE_SIDE


def _pixel_noise(rng: np.random.Generator, size: tuple[int, int], sigma: float) -> np.ndarray:
    return rng.normal(0.0, sigma, size=size + (1,)).astype(np.float32)


def _sky(rng: np.random.Generator, size: tuple[int, int], rgb: np.ndarray) -> np.ndarray:
    height = size[0]
    # Brighter towards the horizon, as a real sky is.
    gradient = np.linspace(-0.12, 0.1, height, dtype=np.float32)[:, None, None]
    base = rgb[None, None, :] * (1 + gradient)
    cells = rng.uniform(2.0, 4.0)
    # Clouds are wider than tall: more noise cells down the rows than across the columns.
    clouds = smooth_noise(rng, size, (cells * 1.8, cells))
    clouds += 0.4 * smooth_noise(rng, size, (cells * 5, cells * 3))
    cover = np.clip((clouds - rng.uniform(0.75, 1.05)) / 0.2, 0.0, 1.0)[..., None] * 0.85
    white = np.array([240, 242, 246], dtype=np.float32)
    return base * (1 - cover) + white * cover + _pixel_noise(rng, size, 2.0)


def _grass(rng: np.random.Generator, size: tuple[int, int], rgb: np.ndarray) -> np.ndarray:
    height, width = size
    s = _scale(size)
    # Blades: fine across columns, elongated along rows.
    blades = smooth_noise(rng, size, (height / (7 * s), width / (1.6 * s))) - 0.5
    patches = smooth_noise(rng, size, (3, 3)) - 0.5
    shade = 1 + 0.55 * blades[..., None] + 0.3 * patches[..., None]
    return rgb[None, None, :] * shade + _pixel_noise(rng, size, 8.0)


def _water(rng: np.random.Generator, size: tuple[int, int], rgb: np.ndarray) -> np.ndarray:
    height, width = size
    s = _scale(size)
    period = rng.uniform(4.5, 8.0) * s
    rows = np.arange(height, dtype=np.float32)[:, None]
    warp = 6.0 * smooth_noise(rng, size, (2, rng.uniform(2, 4)))
    ripple = np.sin(2 * np.pi * rows / period + warp + rng.uniform(0, 2 * np.pi))
    shade = 1 + 0.2 * ripple[..., None]
    out = rgb[None, None, :] * shade
    glint = np.clip((ripple - 0.85) / 0.15, 0, 1)[..., None] * 0.5  # bright wave crests
    out = out * (1 - glint) + np.float32(225) * glint
    return out + _pixel_noise(rng, size, 4.0)


def _sand(rng: np.random.Generator, size: tuple[int, int], rgb: np.ndarray) -> np.ndarray:
    height, width = size
    s = _scale(size)
    dunes = smooth_noise(rng, size, (2.5, 2.5)) - 0.5
    cols = np.arange(width, dtype=np.float32)[None, :]
    rows = np.arange(height, dtype=np.float32)[:, None]
    ripple = np.sin((cols * 0.35 + rows) * 2 * np.pi / (rng.uniform(6, 10) * s))
    shade = 1 + 0.16 * dunes[..., None] + 0.05 * ripple[..., None]
    return rgb[None, None, :] * shade + _pixel_noise(rng, size, 13.0)


def _brick(rng: np.random.Generator, size: tuple[int, int], rgb: np.ndarray) -> np.ndarray:
    height, width = size
    s = _scale(size)
    brick_h = rng.uniform(6.0, 10.0) * s
    brick_w = brick_h * rng.uniform(1.8, 2.6)
    rows = np.arange(height, dtype=np.float32)[:, None] + rng.uniform(0, brick_h)
    cols = np.arange(width, dtype=np.float32)[None, :] + rng.uniform(0, brick_w)
    course = np.floor(rows / brick_h)
    shifted = cols + (course % 2) * brick_w / 2  # alternate courses are offset by half a brick
    column = np.floor(shifted / brick_w)
    mortar_w = max(1.0, 1.2 * s)
    mortar = ((rows % brick_h) < mortar_w) | ((shifted % brick_w) < mortar_w)
    # A per-brick tone from a hash of its (course, column) index, randomised per image.
    tone = np.sin(course * 12.9898 + column * 78.233 + rng.uniform(0, 100)) * 43758.5453
    tone = (tone - np.floor(tone) - 0.5) * 0.3
    out = rgb[None, None, :] * (1 + tone[..., None])
    out = np.where(mortar[..., None], np.float32(185), out)
    return out + _pixel_noise(rng, size, 6.0)


def _gravel(rng: np.random.Generator, size: tuple[int, int], rgb: np.ndarray) -> np.ndarray:
    height, width = size
    s = _scale(size)
    stones = smooth_noise(rng, size, (height / (3.5 * s), width / (3.5 * s))) - 0.5
    grit = smooth_noise(rng, size, (height / (1.5 * s), width / (1.5 * s))) - 0.5
    shade = 1 + 0.6 * stones[..., None] + 0.25 * grit[..., None]
    return rgb[None, None, :] * shade + _pixel_noise(rng, size, 6.0)


TEXTURES: dict[str, TextureFn] = {
    "sky": _sky,
    "grass": _grass,
    "water": _water,
    "sand": _sand,
    "brick": _brick,
    "gravel": _gravel,
}


def render_texture(name: str, rng: np.random.Generator, size: tuple[int, int],
                   rgb: tuple[int, int, int], colour_jitter: float = 14.0) -> np.ndarray:
    """Render texture ``name`` over a full canvas.

    Args:
        name: a key of TEXTURES.
        size: (H, W).
        rgb: reference colour; jittered per channel by up to ±``colour_jitter``.
    Returns:
        H×W×3 float32, unclipped (the scene clips once at the end).
    """
    if name not in TEXTURES:
        raise ValueError(f"unknown texture {name!r}; expected one of {sorted(TEXTURES)}")
    base = np.asarray(rgb, dtype=np.float32) + rng.uniform(-colour_jitter, colour_jitter, 3).astype(np.float32)
    return TEXTURES[name](rng, size, base).astype(np.float32, copy=False)
