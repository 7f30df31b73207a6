"""Training augmentations on (image, instance masks) pairs, in torch.

Mask2Former's panoptic recipe, reduced to what the method needs: random resize of the short side,
a square crop (padded where the image is smaller), horizontal flip, colour jitter. Masks follow the
image geometrically; instances cropped away entirely are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dearli.config import DataConfig


@dataclass(frozen=True)
class AugmentedSample:
    image: torch.Tensor  # 3×S×S uint8
    masks: torch.Tensor  # N×S×S bool
    labels: torch.Tensor  # N int64
    valid: torch.Tensor  # S×S bool, False on padding (so padding never counts as background)


def random_resize(image: torch.Tensor, masks: torch.Tensor, short_side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize so the shortest edge equals ``short_side``.

    Args:
        image: 3×H×W uint8.
        masks: N×H×W bool.
    Returns:
        image 3×H'×W' uint8 (bilinear), masks N×H'×W' bool (nearest).
    """
    h, w = image.shape[-2:]
    scale = short_side / min(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    image = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    image = image.round().clamp(0, 255).to(torch.uint8)
    if masks.shape[0]:
        masks = F.interpolate(masks[None].float(), size=size, mode="nearest")[0] > 0.5
    else:
        masks = masks.new_zeros((0,) + size)
    return image, masks


def random_crop(image: torch.Tensor, masks: torch.Tensor, size: int, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop a ``size``×``size`` window at a random offset, zero-padding where the image is smaller.

    Returns:
        image 3×S×S uint8, masks N×S×S bool, valid S×S bool (True on image pixels).
    """
    h, w = image.shape[-2:]
    top = int(torch.randint(0, max(h - size, 0) + 1, (1,), generator=generator))
    left = int(torch.randint(0, max(w - size, 0) + 1, (1,), generator=generator))
    image = image[:, top:top + size, left:left + size]
    masks = masks[:, top:top + size, left:left + size]
    ch, cw = image.shape[-2:]
    valid = torch.zeros(size, size, dtype=torch.bool)
    valid[:ch, :cw] = True
    if (ch, cw) != (size, size):
        image = F.pad(image, (0, size - cw, 0, size - ch))
        masks = F.pad(masks, (0, size - cw, 0, size - ch))
    return image, masks, valid


def color_jitter(image: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Random brightness, contrast and saturation, each by a factor in [1 - s, 1 + s].

    Args:
        image: 3×H×W uint8.
    """
    if strength <= 0:
        return image
    factors = 1 + (torch.rand(3, generator=generator) * 2 - 1) * strength
    x = image.float()
    x = x * factors[0]
    mean = x.mean()
    x = (x - mean) * factors[1] + mean
    gray = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
    x = (x - gray) * factors[2] + gray
    return x.round().clamp(0, 255).to(torch.uint8)


def augment(image: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, cfg: DataConfig,
            generator: torch.Generator) -> AugmentedSample:
    """The full training augmentation of one sample.

    Args:
        image: 3×H×W uint8. masks: N×H×W bool. labels: N int64 contiguous class ids.
    """
    scale = cfg.min_scale + float(torch.rand(1, generator=generator)) * (cfg.max_scale - cfg.min_scale)
    image, masks = random_resize(image, masks, max(1, round(scale * cfg.crop_size)))
    image, masks, valid = random_crop(image, masks, cfg.crop_size, generator)
    if cfg.flip and bool(torch.rand(1, generator=generator) < 0.5):
        image, masks, valid = image.flip(-1), masks.flip(-1), valid.flip(-1)
    image = color_jitter(image, cfg.color_jitter, generator)
    keep = masks.flatten(1).any(1)
    return AugmentedSample(image=image, masks=masks[keep], labels=labels[keep], valid=valid)
