"""The zero-shot oracle (DEARLi Fig. 3): ground-truth masks, classes from CLIP mask pooling alone.

It separates recognition from segmentation: with perfect masks, how well does frozen CLIP name them?
Reported as recognition accuracy over non-crowd ground-truth segments and as PQ of the resulting
panoptic prediction. Segments keep their ground-truth shape, but ground-truth segments given the same
stuff class are merged into one segment (one segment per stuff class, as Mask2Former predicts), so a
region misnamed as a stuff class also lowers the SQ of that class's correct segment.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dearli.baselines.cached_clip import CachedClipClassifier
from dearli.baselines.prediction_set import PredictionSet
from dearli.model.inference import paint_segment


def oracle_panoptic(segment_masks: np.ndarray, predicted: list[int], thing_ids: tuple[int, ...]
                    ) -> tuple[np.ndarray, list[dict]]:
    """Disjoint masks N×H×W with predicted contiguous classes -> (panoptic H×W int32, segments)."""
    panoptic = np.zeros(segment_masks.shape[1:], dtype=np.int32)
    segments: list[dict] = []
    stuff_segment: dict[int, int] = {}
    for mask, label in zip(segment_masks, predicted):
        paint_segment(panoptic, mask, int(label), label in thing_ids, segments, stuff_segment)
    return panoptic, segments


def run_oracle(info, split_name: str, clip_uri: str, out_dir: str | Path) -> dict:
    """Classify every non-crowd ground-truth segment of the split by cached CLIP mask pooling.

    Returns ``{"accuracy": fraction of segments named correctly, "num_segments", "pq": pq_compute result,
    "per_class_accuracy": {category_id: fraction}}``.
    """
    split = info.split(split_name)
    cats = split.categories
    clip = CachedClipClassifier(clip_uri, cats)
    preds = PredictionSet(out_dir, cats)
    correct = np.zeros(cats.num_classes)
    count = np.zeros(cats.num_classes)
    for record in split.records:
        target = split.load_target(record)
        keep = ~np.asarray(target.iscrowd, dtype=bool)
        masks, labels = target.masks[keep], np.asarray(target.labels)[keep]
        predicted = clip.logits(record.stem, masks).argmax(-1).tolist() if len(masks) else []
        np.add.at(count, labels, 1)
        np.add.at(correct, labels, (np.asarray(predicted, dtype=np.int64) == labels).astype(float))
        preds.add(record, *oracle_panoptic(masks, predicted, cats.thing_ids))
    pq = preds.evaluate(split)
    seen = count > 0
    per_class = {cats.to_dataset_id(k): float(correct[k] / count[k]) for k in np.nonzero(seen)[0]}
    return {"accuracy": float(correct.sum() / max(count.sum(), 1)), "num_segments": int(count.sum()),
            "per_class_accuracy": per_class, "pq": pq}
