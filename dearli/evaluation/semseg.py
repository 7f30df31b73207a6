"""Semantic segmentation metrics (mIoU, fwIoU, mACC, pACC) with detectron2's SemSegEvaluator rules.

* A (K+1)×(K+1) confusion matrix, rows = predicted class, columns = GT class; index K collects
  GT pixels labelled ``ignore_label`` (255), which therefore never count.
* A class with no GT pixels is left out of mean IoU and mean accuracy (its IoU/acc is NaN).
* fwIoU weights each class IoU by its share of GT pixels; pACC = correct pixels / GT pixels.

All values are fractions in [0, 1]; detectron2 reports them ×100 (the CLI table does too).

One extension: a prediction may also hold ``ignore_label`` (VOID pixels of a panoptic prediction
turned into a semantic map). Such a pixel on a labelled GT pixel is a miss of that GT class and a
false positive of no class. detectron2's predictions never contain it, so its numbers are unchanged.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from dearli.data.coco_format import IGNORE_LABEL
from dearli.errors import DataError


class SemSegEvaluator:
    """Accumulates the confusion matrix of semantic maps over a data set.

    Args:
        num_classes: K, classes are 0..K-1.
        ignore_label: GT (and prediction) value that is not evaluated.
    """

    def __init__(self, num_classes: int, ignore_label: int = IGNORE_LABEL):
        if num_classes < 1:
            raise ValueError("num_classes must be ≥ 1")
        if 0 <= ignore_label < num_classes:
            raise ValueError(f"ignore_label {ignore_label} is a valid class index")
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.reset()

    def reset(self) -> None:
        self.conf = np.zeros((self.num_classes + 1, self.num_classes + 1), dtype=np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image.

        Args:
            pred: H×W integer classes in [0, K) or ``ignore_label``.
            gt: H×W integer classes in [0, K) or ``ignore_label``.
        Raises:
            ValueError: shapes differ or a value is neither a class nor ``ignore_label``.
        """
        pred, gt = np.asarray(pred), np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
        k = self.num_classes
        p = self._to_index(pred, "prediction")
        g = self._to_index(gt, "ground truth")
        self.conf += np.bincount((k + 1) * p + g, minlength=(k + 1) ** 2).reshape(k + 1, k + 1)

    def _to_index(self, labels: np.ndarray, what: str) -> np.ndarray:
        flat = labels.reshape(-1).astype(np.intp)
        ignored = flat == self.ignore_label
        bad = ~ignored & ((flat < 0) | (flat >= self.num_classes))
        if bad.any():
            raise ValueError(f"{what} holds values {np.unique(flat[bad])[:10].tolist()} outside "
                             f"[0, {self.num_classes}) that are not ignore_label {self.ignore_label}")
        flat[ignored] = self.num_classes
        return flat

    def compute(self) -> dict:
        """Metrics so far: see :func:`metrics_from_confusion`."""
        return metrics_from_confusion(self.conf)


def metrics_from_confusion(conf: np.ndarray) -> dict:
    """mIoU, fwIoU, mACC, pACC (fractions) and per-class IoU / accuracy from a (K+1)×(K+1) matrix.

    Args:
        conf: rows = prediction, columns = GT; the last row/column is ``ignore``.
    Returns:
        ``{"miou", "fwiou", "macc", "pacc", "iou": [K], "acc": [K]}``; classes without GT pixels have
        NaN IoU and accuracy. Means over no valid class are NaN.
    """
    conf = np.asarray(conf, dtype=np.float64)
    tp = conf.diagonal()[:-1]
    # every labelled GT pixel counts, also one the prediction left as ignore (see module doc)
    pos_gt = conf[:, :-1].sum(axis=0)
    pos_pred = conf[:-1, :-1].sum(axis=1)
    k = len(tp)
    acc, iou = np.full(k, np.nan), np.full(k, np.nan)
    acc_valid = pos_gt > 0
    acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
    union = pos_gt + pos_pred - tp
    iou_valid = acc_valid & (union > 0)
    iou[iou_valid] = tp[iou_valid] / union[iou_valid]
    total = pos_gt.sum()
    weights = pos_gt / total if total else np.zeros(k)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "miou": float(iou[iou_valid].sum() / iou_valid.sum()),
            "fwiou": float((iou[iou_valid] * weights[iou_valid]).sum()),
            "macc": float(acc[acc_valid].sum() / acc_valid.sum()),
            "pacc": float(tp.sum() / total),
            "iou": iou.tolist(),
            "acc": acc.tolist(),
        }


def contiguous_category_ids(categories: list[dict]) -> dict:
    """category_id -> contiguous class 0..K-1, by increasing category id (detectron2's convention)."""
    return {cid: i for i, cid in enumerate(sorted({cat["id"] for cat in categories}))}


def evaluate_semseg_dirs(
    gt_dir: str | Path, pred_dir: str | Path, num_classes: int, *, ignore_label: int = IGNORE_LABEL,
    progress: bool = True,
) -> dict:
    """Evaluate single-channel semantic PNGs: every ``*.png`` of ``gt_dir`` against the same name in ``pred_dir``."""
    from tqdm import tqdm

    names = sorted(n for n in os.listdir(gt_dir) if n.lower().endswith(".png"))
    if not names:
        raise DataError(gt_dir, "no .png files to evaluate")
    evaluator = SemSegEvaluator(num_classes, ignore_label)
    for name in tqdm(names, desc="mIoU", unit="img", file=sys.stderr, disable=not progress):
        gt = _read_label_png(os.path.join(gt_dir, name))
        pred_path = os.path.join(pred_dir, name)
        pred = _read_label_png(pred_path)
        try:
            evaluator.update(pred, gt)
        except ValueError as err:
            raise DataError(pred_path, str(err)) from None
    return evaluator.compute()


def _read_label_png(path: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except FileNotFoundError:
        raise DataError(path, "PNG file not found") from None
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(path, f"cannot read PNG: {err}") from None
    if arr.ndim != 2:
        raise DataError(path, f"expected a single-channel label PNG, got shape {arr.shape}")
    return arr


def evaluate_semseg_panoptic(
    gt_json: str | Path | Mapping, gt_dir: str | Path, pred_json: str | Path | Mapping, pred_dir: str | Path,
    *, workers: int | None = None, progress: bool = True, gt_cache_dir: str | Path | None = None,
) -> dict:
    """Semantic metrics of panoptic predictions against panoptic GT (both turned into semantic maps).

    Classes are the GT categories in increasing id order. Returns :func:`metrics_from_confusion`'s
    dict plus ``"pq"``, the panoptic quality computed in the same pass.
    """
    from dearli.evaluation.panoptic_io import load_categories, load_json
    from dearli.evaluation.pq import collect_stats, pq_from_stats

    gt, gt_path = load_json(gt_json, "ground-truth")
    classes = contiguous_category_ids(load_categories(gt, gt_path))
    stats, conf = collect_stats(gt_json if gt_path is None else gt_path, gt_dir, pred_json, pred_dir,
                                workers=workers, progress=progress, semseg_index=classes,
                                gt_cache_dir=gt_cache_dir)
    return metrics_from_confusion(conf) | {"pq": pq_from_stats(stats)}


def semantic_ground_truth(split: Any, record: Any) -> np.ndarray:
    """The H×W uint8 semantic map of a record: its semantic PNG, or derived from the panoptic GT."""
    if record.semantic_path is not None:
        return split.load_semantic(record)
    target = split.load_target(record)
    semantic = np.full(target.segment_map.shape, IGNORE_LABEL, dtype=np.uint8)
    for seg_id, label in zip(target.segment_ids, target.labels):
        semantic[target.segment_map == seg_id] = label
    return semantic
