"""The student's strong view in the Mean-Teacher stage: photometric perturbation and CutMix.

Upstream DEARLi (after UniMatch) perturbs each unlabeled weak view with ColorJitter(0.8, 0.8, 0.8, 0.2)
always, random grayscale (p = 0.2) and Gaussian blur (σ ∈ [0.1, 2], p = 0.5), then, with probability p,
pastes a random box of a second perturbed unlabeled image into the first; the two teacher pseudo-labels
are merged the same way. Nothing here moves a pixel except CutMix's paste, which moves image and label
together, so the teacher's pseudo-label of the weak view stays aligned with the student's image.

All randomness comes from a ``torch.Generator``; images are uint8 tensors (no PIL round trip).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as TF

from dearli.config import StrongViewConfig
from dearli.training.pseudo_labels import PseudoLabel

UPSTREAM_VIEW = StrongViewConfig()  # upstream DEARLi's strengths (the config's defaults)
# CutMix box as UniMatch: area a fraction U(0.02, 0.4) of the image, aspect ratio (h/w) U(0.3, 1/0.3).
CUTMIX_AREA = (0.02, 0.4)
CUTMIX_RATIO = (0.3, 1 / 0.3)
# Rejection sampling of a box that fits; square crops accept within a few draws. A pathological aspect
# ratio (e.g. 100×1) may never fit: give up after this many draws and do not mix.
CUTMIX_MAX_DRAWS = 1000


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + float(torch.rand(1, generator=generator)) * (high - low)


def _coin(prob: float, generator: torch.Generator) -> bool:
    """True with probability ``prob`` (never for 0, always for 1)."""
    return bool(torch.rand(1, generator=generator) < prob)


def _jitter(image: torch.Tensor, params: StrongViewConfig, generator: torch.Generator) -> torch.Tensor:
    """ColorJitter: the four adjustments in a random order, each with its own random factor."""
    factors = {
        "brightness": _uniform(max(0.0, 1 - params.brightness), 1 + params.brightness, generator),
        "contrast": _uniform(max(0.0, 1 - params.contrast), 1 + params.contrast, generator),
        "saturation": _uniform(max(0.0, 1 - params.saturation), 1 + params.saturation, generator),
        "hue": _uniform(-params.hue, params.hue, generator),
    }
    ops = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
           "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}
    names = list(factors)
    for index in torch.randperm(4, generator=generator).tolist():
        name = names[index]
        image = ops[name](image, factors[name])
    return image


def _blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur with standard deviation ``sigma`` px (PIL's GaussianBlur radius is this σ)."""
    # ±3σ holds 99.7% of the kernel's mass; reflect padding needs the half-width below the image size.
    half = min(max(1, math.ceil(3 * sigma)), min(image.shape[-2:]) - 1)
    if half < 1:
        return image
    return TF.gaussian_blur(image, kernel_size=[2 * half + 1, 2 * half + 1], sigma=[sigma, sigma])


def _strong_one(image: torch.Tensor, params: StrongViewConfig, generator: torch.Generator) -> torch.Tensor:
    """3×H×W uint8 -> 3×H×W uint8; the chain runs on floats in [0, 1], rounding once at the end."""
    x = image.float() / 255
    x = _jitter(x, params, generator)
    if _coin(params.grayscale_prob, generator):
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if _coin(params.blur_prob, generator):
        x = _blur(x, _uniform(*params.blur_sigma, generator))
    return (x * 255).round_().clamp_(0, 255).to(torch.uint8)


def strong_augment(images: torch.Tensor, generator: torch.Generator, valid: torch.Tensor | None = None,
                   params: StrongViewConfig = UPSTREAM_VIEW) -> torch.Tensor:
    """Photometric strong view: colour jitter, random grayscale, Gaussian blur; geometry unchanged.

    Args:
        images: 3×H×W or B×3×H×W uint8 (each image of a batch draws its own perturbation).
        valid: H×W or B×H×W bool; pixels outside it (padding) keep their value, as upstream pads after
            perturbing. None perturbs every pixel.
    Returns:
        uint8, the shape of ``images``.
    """
    if images.dtype != torch.uint8 or images.dim() not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"expected uint8 3×H×W or B×3×H×W images, got {images.dtype} {tuple(images.shape)}")
    if images.dim() == 4:
        masks = [None] * images.shape[0] if valid is None else list(valid)
        return torch.stack([strong_augment(im, generator, m, params) for im, m in zip(images, masks)])
    out = _strong_one(images, params, generator)
    if valid is not None:
        out = torch.where(valid.to(out.device)[None], out, images)
    return out


@dataclass(frozen=True)
class Box:
    """A CutMix box in pixels: rows [top, top + height), columns [left, left + width)."""

    top: int
    left: int
    height: int
    width: int

    def mask(self, height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """H×W bool, True inside the box."""
        out = torch.zeros(height, width, dtype=torch.bool, device=device)
        out[self.top:self.top + self.height, self.left:self.left + self.width] = True
        return out


def sample_cutmix_box(height: int, width: int, prob: float, generator: torch.Generator) -> Box | None:
    """With probability ``prob`` a random box as UniMatch draws it, else None (also None if the box is empty).

    The area is U(0.02, 0.4)·H·W; then aspect ratio r ~ U(0.3, 1/0.3), box w = ⌊√(area / r)⌋,
    h = ⌊√(area·r)⌋ and a top-left corner uniform over the image are redrawn until the box fits.
    """
    if not _coin(prob, generator):
        return None
    area = _uniform(*CUTMIX_AREA, generator) * height * width
    for _ in range(CUTMIX_MAX_DRAWS):
        ratio = _uniform(*CUTMIX_RATIO, generator)
        box_w, box_h = int(math.sqrt(area / ratio)), int(math.sqrt(area * ratio))
        left = int(torch.randint(0, width, (1,), generator=generator))
        top = int(torch.randint(0, height, (1,), generator=generator))
        if left + box_w <= width and top + box_h <= height:
            return Box(top, left, box_h, box_w) if box_w > 0 and box_h > 0 else None
    return None


def merge_labels(label_a: PseudoLabel, label_b: PseudoLabel, box: Box) -> PseudoLabel:
    """a's pseudo-label outside ``box`` + b's inside it, as one panoptic label.

    b's segment ids are shifted past a's largest id, so every id stays distinct; a segment left without a
    pixel (a's covered by the box, b's outside it) is dropped. The valid maps merge the same way.
    """
    if label_a.panoptic.shape != label_b.panoptic.shape:
        raise ValueError(f"cannot merge pseudo-labels of sizes {tuple(label_a.panoptic.shape)} and "
                         f"{tuple(label_b.panoptic.shape)}")
    height, width = label_a.panoptic.shape
    inside = box.mask(height, width, label_a.panoptic.device)
    offset = max([int(s["id"]) for s in label_a.segments] + [int(label_a.panoptic.max())])
    shifted_b = torch.where(label_b.panoptic > 0, label_b.panoptic + offset, label_b.panoptic)
    panoptic = torch.where(inside, shifted_b, label_a.panoptic)
    present = {int(i) for i in torch.unique(panoptic)}
    segments = [dict(s) for s in label_a.segments if int(s["id"]) in present]
    for seg in label_b.segments:
        if int(seg["id"]) + offset in present:
            segments.append({**seg, "id": int(seg["id"]) + offset})
    valid = None
    if label_a.valid is not None or label_b.valid is not None:
        valid = torch.where(inside, label_b.valid_mask(), label_a.valid_mask())
    return PseudoLabel(panoptic, segments, valid)


def paste_box(image_a: torch.Tensor, image_b: torch.Tensor, box: Box) -> torch.Tensor:
    """A copy of ``image_a`` (...×H×W) with ``image_b``'s pixels inside ``box``."""
    image = image_a.clone()
    rows, cols = slice(box.top, box.top + box.height), slice(box.left, box.left + box.width)
    image[..., rows, cols] = image_b[..., rows, cols]
    return image


def image_extent(valid: torch.Tensor | None, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the image pixels of a weak view: the bounding box of ``valid`` (H×W bool;
    padding lies below and to one side), the whole canvas when ``valid`` is None or empty."""
    if valid is None or not bool(valid.any()):
        return 0, 0, height, width
    rows, cols = valid.any(1).nonzero().flatten(), valid.any(0).nonzero().flatten()
    top, left = int(rows[0]), int(cols[0])
    return top, left, int(rows[-1]) + 1 - top, int(cols[-1]) + 1 - left


def sample_partner_box(label_b: PseudoLabel, prob: float, generator: torch.Generator) -> Box | None:
    """A CutMix box drawn within the partner's image pixels, as upstream draws it on the partner image before
    padding (its area is a share of the partner's image, not of the padded canvas)."""
    height, width = label_b.panoptic.shape
    top, left, image_h, image_w = image_extent(label_b.valid, height, width)
    box = sample_cutmix_box(image_h, image_w, prob, generator)
    return None if box is None else Box(box.top + top, box.left + left, box.height, box.width)


def student_view(weak_a: torch.Tensor, label_a: PseudoLabel, weak_b: torch.Tensor, label_b: PseudoLabel,
                 cutmix_prob: float, generator: torch.Generator,
                 params: StrongViewConfig = UPSTREAM_VIEW) -> tuple[torch.Tensor, PseudoLabel, Box | None]:
    """The student's image and target: both weak views perturbed independently (as upstream), then a box of
    b (drawn within b's image pixels) pasted into a with probability ``cutmix_prob``. b is only perturbed
    when it is used.

    Args:
        weak_a, weak_b: 3×S×S uint8 weak views of two different images; label_a, label_b: their teacher
            pseudo-labels (S×S).
    Returns:
        (strong image 3×S×S uint8, its pseudo-label, the CutMix box or None).
    """
    if weak_a.shape != weak_b.shape or tuple(weak_a.shape[-2:]) != tuple(label_a.panoptic.shape):
        raise ValueError(f"student_view needs weak views and labels of one size, got {tuple(weak_a.shape)}, "
                         f"{tuple(weak_b.shape)}, label {tuple(label_a.panoptic.shape)}")
    box = sample_partner_box(label_b, cutmix_prob, generator)
    strong_a = strong_augment(weak_a, generator, label_a.valid, params)
    if box is None:
        return strong_a, label_a, None
    strong_b = strong_augment(weak_b, generator, label_b.valid, params)
    return paste_box(strong_a, strong_b, box), merge_labels(label_a, label_b, box), box
