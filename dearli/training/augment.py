"""Training augmentations on (image, instance masks) pairs, in torch: DEARLi's (Mask2Former's) recipe for
labeled and warm-up images.

1. Resize: the short side is drawn from ``data.short_sides``, the long side capped at ``data.max_size``
   (detectron2's ResizeShortestEdge, "choice" sampling). The image is resized bilinearly (antialiased when
   shrinking, like PIL); masks with pixel-centre nearest neighbours, so a mask stays on its pixels.
2. A ``crop_size`` square at a random offset; an image smaller than that is padded bottom/right with
   ``PAD_VALUE`` (grey, as upstream pads before normalising). Masks are 0 on the padding, so padding is
   background for every mask in the loss, as upstream; ``valid`` marks the image pixels for callers that
   need them (pseudo-labels, visualisation).
3. Horizontal flip with p = 0.5.
4. SSD photometric distortion (upstream COLOR_AUG_SSD), see :func:`ssd_color_aug`.

Instances cropped away entirely are dropped. The random draws come in the order resize, crop, flip,
colour, so the geometric part can be replayed without the colour (the teacher's weak view).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dearli.config import DataConfig
from dearli.model.inference import shortest_edge_size

PAD_VALUE = 128  # image padding of training crops (upstream's dataset mappers pad raw images with 128)
# SSD photometric distortion (upstream ColorAugSSDTransform): each op applies with probability 1/2.
BRIGHTNESS_DELTA = 32.0  # added to every channel, uniform in [-32, 32]
CONTRAST_RANGE = (0.5, 1.5)  # every channel multiplied by a factor in this range
SATURATION_RANGE = (0.5, 1.5)  # HSV saturation multiplied by a factor in this range
HUE_UNIT_DEGREES = 2.0  # the hue shift is drawn in OpenCV's 8-bit hue units (180 per turn)


@dataclass(frozen=True)
class AugmentedSample:
    image: torch.Tensor  # 3×S×S uint8
    masks: torch.Tensor  # N×S×S bool
    labels: torch.Tensor  # N int64
    valid: torch.Tensor  # S×S bool, True on image pixels, False on padding


def draw_short_side(cfg: DataConfig, generator: torch.Generator) -> int:
    """The short side of one training resize: uniform over ``cfg.short_sides`` (one draw)."""
    return int(cfg.short_sides[int(torch.randint(len(cfg.short_sides), (1,), generator=generator))])


def nearest_indices(out_len: int, in_len: int, start: int = 0, count: int | None = None) -> torch.Tensor:
    """Source index of output pixels ``start .. start+count-1`` of a nearest resize ``in_len -> out_len``.

    Pixel centres are aligned (output pixel j samples the source at (j + 0.5)·in/out − 0.5, rounded), as
    PIL's NEAREST does; torch's ``mode="nearest"`` floors j·in/out instead, which shifts a mask up to half
    a source pixel against its bilinearly resized image.
    """
    count = out_len - start if count is None else count
    j = torch.arange(start, start + count, dtype=torch.float64)
    return ((j + 0.5) * (in_len / out_len)).floor().clamp(0, in_len - 1).long()


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """3×H×W uint8 -> 3×h×w uint8, bilinear (pixel centres aligned), antialiased when shrinking."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return out.round().clamp(0, 255).to(torch.uint8)


def resize_masks(masks: torch.Tensor, size: tuple[int, int], top: int = 0, left: int = 0,
                 window: tuple[int, int] | None = None) -> torch.Tensor:
    """N×H×W bool masks resized to ``size`` (pixel-centre nearest), keeping only the ``window`` (h, w) at
    (top, left) of the result (default: all of it), without building the full-size masks."""
    height, width = masks.shape[-2:]
    wh, ww = (size[0] - top, size[1] - left) if window is None else window
    rows = nearest_indices(size[0], height, top, wh)
    cols = nearest_indices(size[1], width, left, ww)
    return masks[:, rows[:, None], cols[None, :]]


def crop_offsets(height: int, width: int, size: int, generator: torch.Generator) -> tuple[int, int]:
    """Random top-left corner of a ``size`` square in an H×W image (0 along a side shorter than it)."""
    top = int(torch.randint(0, max(height - size, 0) + 1, (1,), generator=generator))
    left = int(torch.randint(0, max(width - size, 0) + 1, (1,), generator=generator))
    return top, left


def _pad(image: torch.Tensor, masks: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad a crop of at most size×size to size×size (image with PAD_VALUE, masks with 0); also the valid map."""
    ch, cw = image.shape[-2:]
    valid = torch.zeros(size, size, dtype=torch.bool)
    valid[:ch, :cw] = True
    if (ch, cw) != (size, size):
        image = F.pad(image, (0, size - cw, 0, size - ch), value=PAD_VALUE)
        masks = F.pad(masks, (0, size - cw, 0, size - ch))
    return image, masks, valid


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """3×H×W RGB in [0, 1] -> hue (turns, [0, 1)), saturation, value; each H×W."""
    value, argmax = x.max(0)
    delta = value - x.min(0).values
    saturation = torch.where(value > 0, delta / value.clamp_min(1e-12), torch.zeros_like(value))
    r, g, b = x
    d = delta.clamp_min(1e-12)
    hue = torch.stack([(g - b) / d, 2.0 + (b - r) / d, 4.0 + (r - g) / d]).gather(0, argmax[None])[0]
    hue = torch.where(delta > 0, (hue / 6.0).remainder(1.0), torch.zeros_like(hue))
    return hue, saturation, value


def _hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_rgb_to_hsv`: H×W hue (turns), saturation, value -> 3×H×W RGB in [0, 1]."""
    h6 = hue.remainder(1.0) * 6.0
    sector = h6.floor().long().clamp(0, 5)
    f = h6 - sector
    p, q, t = value * (1 - saturation), value * (1 - saturation * f), value * (1 - saturation * (1 - f))
    # (r, g, b) of each of the six hue sectors, picked per pixel.
    table = torch.stack([torch.stack(c) for c in ((value, t, p), (q, value, p), (p, value, t),
                                                  (p, q, value), (t, p, value), (value, p, q))])  # 6×3×H×W
    return table.gather(0, sector[None, None].expand(1, 3, *sector.shape))[0]


def _coin(generator: torch.Generator) -> bool:
    return bool(torch.rand(1, generator=generator) < 0.5)


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand(1, generator=generator))


def ssd_color_aug(image: torch.Tensor, generator: torch.Generator, hue_delta: int = 18) -> torch.Tensor:
    """SSD photometric distortion, as upstream's ColorAugSSDTransform (DEARLi's labeled and warm-up data).

    Brightness (add ±32), then either contrast, saturation, hue or saturation, hue, contrast (p = 1/2
    each order); every op applies with p = 1/2. Contrast multiplies every channel by a factor in
    [0.5, 1.5] (no mean subtraction, as upstream), saturation scales HSV saturation by [0.5, 1.5], hue
    shifts by an integer in [-hue_delta, hue_delta] OpenCV units (2° each). Values are clipped to
    [0, 255] after every op.

    Args:
        image: 3×H×W uint8 RGB.
    Returns:
        3×H×W uint8.
    """
    x = image.float()
    if _coin(generator):
        x = (x + _uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA, generator)).clamp(0, 255)
    contrast_first = _coin(generator)

    def contrast(x: torch.Tensor) -> torch.Tensor:
        return (x * _uniform(*CONTRAST_RANGE, generator)).clamp(0, 255) if _coin(generator) else x

    if contrast_first:
        x = contrast(x)
    if _coin(generator):
        hue, sat, val = _rgb_to_hsv(x / 255.0)
        x = _hsv_to_rgb(hue, (sat * _uniform(*SATURATION_RANGE, generator)).clamp(0, 1), val) * 255.0
    if _coin(generator) and hue_delta > 0:
        shift = int(torch.randint(-hue_delta, hue_delta + 1, (1,), generator=generator))
        hue, sat, val = _rgb_to_hsv(x / 255.0)
        x = _hsv_to_rgb(hue + shift * HUE_UNIT_DEGREES / 360.0, sat, val) * 255.0
    if not contrast_first:
        x = contrast(x)
    return x.round().clamp(0, 255).to(torch.uint8)


def augment(image: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, cfg: DataConfig,
            generator: torch.Generator) -> AugmentedSample:
    """The full training augmentation of one sample (see the module docstring).

    Args:
        image: 3×H×W uint8. masks: N×H×W bool. labels: N int64 contiguous class ids.
    """
    height, width = image.shape[-2:]
    size = shortest_edge_size(height, width, draw_short_side(cfg, generator), cfg.max_size)
    image = resize_image(image, size)
    top, left = crop_offsets(size[0], size[1], cfg.crop_size, generator)
    window = (min(cfg.crop_size, size[0] - top), min(cfg.crop_size, size[1] - left))
    image = image[:, top:top + window[0], left:left + window[1]]
    # Masks are resized inside the crop window only: N full-size masks at 1280 px would not fit in memory.
    image, masks, valid = _pad(image, resize_masks(masks, size, top, left, window), cfg.crop_size)
    if cfg.flip and _coin(generator):
        image, masks, valid = image.flip(-1), masks.flip(-1), valid.flip(-1)
    if cfg.color_aug:
        image = ssd_color_aug(image, generator, cfg.hue_delta)
    keep = masks.flatten(1).any(1)
    return AugmentedSample(image=image, masks=masks[keep], labels=labels[keep], valid=valid)
