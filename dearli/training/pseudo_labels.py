"""Panoptic pseudo-labels of the Mean-Teacher stage: the teacher's weak view, the labels, the student's targets.

The teacher labels a *weak view* of an unlabeled image (the geometric part of the training augmentation:
random resize, crop, flip); the student trains on a strong view of the same pixels (photometric changes and
CutMix only, see :mod:`dearli.training.strong_augment`), so pseudo-label and student image stay aligned.

A :class:`PseudoLabel` is the teacher's panoptic prediction (:class:`dearli.model.predictor.Prediction`)
restricted to the image pixels of the weak view. :func:`to_targets` turns it into the hard Mask2Former targets
of :func:`dearli.training.data.collate`: one mask per thing segment and per stuff class. Unlabeled pixels
(id 0, padding, dropped low-confidence segments) belong to no target: no class, not even a "background"
segment, is taught there; only a matched query's mask loss sees them, as pixels outside its mask (as
upstream builds its pseudo-label targets).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from dearli.config import DataConfig
from dearli.training.augment import augment


@dataclass(frozen=True)
class PseudoLabel:
    panoptic: torch.Tensor  # H×W int32 segment ids, 0 = unlabeled
    segments: list[dict]  # {"id", "category_id" (contiguous), "isthing", "score" (teacher class probability)}
    valid: torch.Tensor | None = None  # H×W bool, False on padding; None = every pixel is image

    def valid_mask(self) -> torch.Tensor:
        """H×W bool: the image pixels (all of them when ``valid`` is None)."""
        if self.valid is None:
            return torch.ones(self.panoptic.shape, dtype=torch.bool, device=self.panoptic.device)
        return self.valid

    def present_ids(self) -> set[int]:
        """Segment ids that own at least one pixel."""
        ids = torch.unique(self.panoptic)
        return {int(i) for i in ids if int(i) != 0}


def from_prediction(prediction: Any, valid: torch.Tensor | np.ndarray | None = None) -> PseudoLabel:
    """A teacher :class:`~dearli.model.predictor.Prediction` (or anything with ``panoptic`` H×W and
    ``segments``) as a pseudo-label; pixels outside ``valid`` (H×W bool, the weak view's padding) become
    unlabeled, and segments left without a pixel are dropped."""
    panoptic = torch.as_tensor(np.asarray(prediction.panoptic), dtype=torch.int32).clone()
    valid_t = None
    if valid is not None:
        valid_t = torch.as_tensor(valid, dtype=torch.bool)
        if valid_t.shape != panoptic.shape:
            raise ValueError(f"valid {tuple(valid_t.shape)} does not match panoptic {tuple(panoptic.shape)}")
        panoptic[~valid_t] = 0
    present = {int(i) for i in torch.unique(panoptic)}
    segments = [_segment(s) for s in prediction.segments if int(s["id"]) in present]
    return PseudoLabel(panoptic, segments, valid_t)


def _segment(seg: dict) -> dict:
    return {"id": int(seg["id"]), "category_id": int(seg["category_id"]), "isthing": bool(seg["isthing"]),
            "score": float(seg.get("score", 1.0))}


def kept_segments(label: PseudoLabel, min_confidence: float, thing_min_confidence: float | None = None) -> list[dict]:
    """Segments with at least one pixel and a score >= ``min_confidence`` (a segment without score counts 1);
    thing segments need ``thing_min_confidence`` instead when it is given (above 1: no thing is kept)."""
    present = label.present_ids()
    thing_floor = min_confidence if thing_min_confidence is None else thing_min_confidence
    return [s for s in label.segments if int(s["id"]) in present
            and s.get("score", 1.0) >= (thing_floor if s["isthing"] else min_confidence)]


def to_targets(label: PseudoLabel, min_confidence: float = 0.0,
               thing_min_confidence: float | None = None) -> dict[str, torch.Tensor]:
    """Hard Mask2Former targets: {"masks": N×H×W bool, "labels": N int64}.

    One target per thing segment and one per stuff class (stuff segments of one class, e.g. from the two
    images of a CutMix, are merged, as a panoptic map allows one segment per stuff class). Segments below
    ``min_confidence`` (things: ``thing_min_confidence`` when given) are dropped: their pixels are left to no
    target (no background segment is made).
    """
    kept = kept_segments(label, min_confidence, thing_min_confidence)
    height, width = label.panoptic.shape
    if not kept:
        return {"masks": torch.zeros(0, height, width, dtype=torch.bool), "labels": torch.zeros(0, dtype=torch.int64)}
    ids = torch.tensor([int(s["id"]) for s in kept], dtype=label.panoptic.dtype, device=label.panoptic.device)
    segment_masks = label.panoptic[None] == ids[:, None, None]  # S×H×W
    masks, labels, stuff_row = [], [], {}
    for seg, mask in zip(kept, segment_masks):
        category = int(seg["category_id"])
        if not seg["isthing"] and category in stuff_row:
            masks[stuff_row[category]] = masks[stuff_row[category]] | mask
            continue
        if not seg["isthing"]:
            stuff_row[category] = len(masks)
        masks.append(mask)
        labels.append(category)
    return {"masks": torch.stack(masks).cpu(), "labels": torch.tensor(labels, dtype=torch.int64)}


def pseudo_label_stats(labels: Sequence[PseudoLabel], min_confidence: float = 0.0,
                       thing_min_confidence: float | None = None) -> dict[str, float]:
    """Numbers to log about a batch of pseudo-labels (segments counted only if kept, as :func:`kept_segments`).

    Returns:
        segments_per_image: mean number of kept segments per image; things_per_image: of them thing segments;
        labeled_fraction: pixels owned by a kept segment / image pixels (padding excluded), over the batch;
        mean_confidence: mean teacher score of the kept segments (0 when there is none).
    """
    segments, things, labeled, pixels, scores = 0, 0, 0, 0, []
    for label in labels:
        kept = kept_segments(label, min_confidence, thing_min_confidence)
        segments += len(kept)
        things += sum(1 for s in kept if s["isthing"])
        scores.extend(float(s.get("score", 1.0)) for s in kept)
        ids = torch.tensor([int(s["id"]) for s in kept], dtype=label.panoptic.dtype, device=label.panoptic.device)
        labeled += int(torch.isin(label.panoptic, ids).sum()) if kept else 0
        pixels += int(label.valid_mask().sum())
    return {
        "segments_per_image": segments / len(labels) if labels else 0.0,
        "things_per_image": things / len(labels) if labels else 0.0,
        "labeled_fraction": labeled / pixels if pixels else 0.0,
        "mean_confidence": float(np.mean(scores)) if scores else 0.0,
    }


def weak_view(image: torch.Tensor, cfg: DataConfig, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The geometric part of :func:`dearli.training.augment.augment` applied to an unlabeled image.

    It IS ``augment`` (random resize, crop, flip, drawn from ``generator``) with the photometric distortion
    switched off and no masks, so unlabeled views follow the labeled data's geometry by construction: the
    teacher labels exactly the pixels the student's strong view will show.

    Args:
        image: 3×H×W uint8.
    Returns:
        image 3×S×S uint8, valid S×S bool (False on padding), params {"source_hw": (H, W)} (S = ``cfg.crop_size``).
    """
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 3×H×W image, got {image.dtype} {tuple(image.shape)}")
    height, width = image.shape[-2:]
    no_masks = torch.zeros(0, height, width, dtype=torch.bool)
    sample = augment(image, no_masks, torch.zeros(0, dtype=torch.int64), replace(cfg, color_aug=False), generator)
    return sample.image, sample.valid, {"source_hw": (int(height), int(width))}


def truth_view(image: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, thing_ids: Sequence[int],
               cfg: DataConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, PseudoLabel]:
    """The ground truth of an image in the geometry of its weak view: with a generator seeded as the one given
    to :func:`weak_view`, the same view, valid map and crop, and the truth as a :class:`PseudoLabel` (score 1).

    Args:
        image: 3×H×W uint8; masks: N×H×W bool (non-crowd segments); labels: N contiguous class ids.
    Returns:
        (view 3×S×S uint8, valid S×S bool, label S×S: segment i + 1 for the i-th mask left in the crop).
    """
    sample = augment(image, masks, labels, replace(cfg, color_aug=False), generator)
    things = set(int(t) for t in thing_ids)
    panoptic = torch.zeros(sample.valid.shape, dtype=torch.int32)
    segments = []
    for index, (mask, label) in enumerate(zip(sample.masks, sample.labels.tolist()), start=1):
        panoptic[mask] = index
        segments.append({"id": index, "category_id": int(label), "isthing": int(label) in things, "score": 1.0})
    return sample.image, sample.valid, PseudoLabel(panoptic, segments, sample.valid)


def thing_agreement(predicted: PseudoLabel, truth: PseudoLabel, iou: float = 0.5) -> tuple[int, int, int]:
    """How many thing segments of ``predicted`` match one of ``truth`` (same class, IoU > ``iou``; each truth
    segment matched once, as PQ matches): (matched, predicted things, true things) on the same crop."""
    true = [s for s in truth.segments if s["isthing"]]
    pred = [s for s in predicted.segments if s["isthing"]]
    matched, used = 0, set()
    for seg in pred:
        mask = predicted.panoptic == int(seg["id"])
        for other in true:
            if other["id"] in used or other["category_id"] != seg["category_id"]:
                continue
            true_mask = truth.panoptic == int(other["id"])
            union = int((mask | true_mask).sum())
            if union and int((mask & true_mask).sum()) / union > iou:
                matched += 1
                used.add(other["id"])
                break
    return matched, len(pred), len(true)


def collate_pseudo(images: torch.Tensor | Sequence[torch.Tensor], labels: Sequence[PseudoLabel],
                   min_confidence: float = 0.0, stems: Sequence[str] | None = None,
                   thing_min_confidence: float | None = None) -> dict[str, Any]:
    """A student batch of strong views and their pseudo-labels, in :func:`dearli.training.data.collate`'s format.

    Args:
        images: B×3×S×S uint8 (or B tensors 3×S×S), aligned with ``labels`` (each S×S).
    Returns:
        {"images": B×3×S×S uint8, "valid": B×S×S bool, "targets": [{"masks", "labels"}], "stems": [str]}
    """
    images = torch.stack(list(images)) if not isinstance(images, torch.Tensor) else images
    if images.shape[0] != len(labels):
        raise ValueError(f"{images.shape[0]} images but {len(labels)} pseudo-labels")
    for label in labels:
        if tuple(label.panoptic.shape) != tuple(images.shape[-2:]):
            raise ValueError(f"pseudo-label {tuple(label.panoptic.shape)} does not match images "
                             f"{tuple(images.shape[-2:])}")
    return {
        "images": images,
        "valid": torch.stack([label.valid_mask() for label in labels]),
        "targets": [to_targets(label, min_confidence, thing_min_confidence) for label in labels],
        "stems": list(stems) if stems is not None else [""] * len(labels),
    }
