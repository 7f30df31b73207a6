"""SAM + CLIP zero-shot panoptic baseline, entirely from caches.

Every cached SAM mask is classified by mask pooling of the cached CLIP features; its score is the top
class probability times SAM's predicted IoU (mask quality). The masks are then merged into a panoptic
map by Mask2Former's rule (:func:`dearli.model.inference.panoptic_inference`): each pixel goes to the
highest-scoring mask covering it, a mask is kept only if it keeps at least ``overlap_threshold`` of its
area, and masks of the same stuff class share one segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dearli.baselines.cached_clip import CachedClipClassifier
from dearli.baselines.prediction_set import PredictionSet
from dearli.caches.readers import decode_masks, read_sam_cache
from dearli.errors import DataError
from dearli.model.inference import panoptic_inference

MASK_LOGIT = 20.0  # binary masks as logits: sigmoid(±20) is 0/1 to float precision


@dataclass(frozen=True)
class SamClipOptions:
    score_threshold: float = 0.0  # drop masks whose score (class prob × predicted IoU) is not above this
    overlap_threshold: float = 0.5  # keep a mask only if it owns this share of its pixels
    min_area: int = 0  # drop SAM masks smaller than this (pixels) before classification
    use_mask_quality: bool = True  # multiply the class probability by SAM's predicted IoU


def merge_masks(masks: torch.Tensor, probs: torch.Tensor, quality: torch.Tensor, thing_ids: tuple[int, ...],
                options: SamClipOptions) -> tuple[torch.Tensor, list[dict]]:
    """masks N×H×W bool, probs N×K, quality (N,) -> (panoptic H×W int32, segments with contiguous ids)."""
    if not options.use_mask_quality:
        quality = torch.ones_like(quality)
    scores = probs * quality[:, None]
    mask_cls = torch.cat([scores, torch.zeros(len(scores), 1)], dim=1)  # void column: never the argmax
    logits = (masks.float() * 2 - 1) * MASK_LOGIT
    return panoptic_inference(mask_cls, logits, thing_ids, options.score_threshold, options.overlap_threshold,
                              probs=True)


def run_sam_clip(info, split_name: str, sam_uri: str, clip_uri: str, out_dir: str | Path,
                 options: SamClipOptions = SamClipOptions()) -> dict:
    """Predict every image of the split from the caches into ``out_dir`` and compute PQ.

    Returns ``{"pq": pq_compute result, "pred_json": path, "num_masks": total masks classified}``.
    """
    split = info.split(split_name)
    sam = read_sam_cache(sam_uri)
    missing = [stem for stem in split.stems if stem not in sam]
    if missing:
        raise DataError(sam_uri, f"{len(missing)} image(s) of split '{split_name}' are not in the SAM cache "
                                 f"(e.g. {', '.join(missing[:3])}); run 'dearli cache sam' for them")
    clip = CachedClipClassifier(clip_uri, split.categories)
    preds = PredictionSet(out_dir, split.categories)
    total = 0
    for record in split.records:
        row = sam[record.stem]
        if (row["height"], row["width"]) != (record.height, record.width):
            raise DataError(sam_uri, f"image '{record.stem}' was cached at {row['height']}×{row['width']}, "
                                     f"the dataset says {record.height}×{record.width}")
        masks = decode_masks(row)
        keep = [i for i, area in enumerate(row["area"]) if area >= max(options.min_area, 1)]
        masks = masks[keep]
        probs = clip.logits(record.stem, masks).softmax(-1)
        quality = torch.tensor([row["predicted_iou"][i] for i in keep], dtype=torch.float32)
        panoptic, segments = merge_masks(torch.from_numpy(masks), probs, quality, split.categories.thing_ids,
                                         options)
        preds.add(record, panoptic.numpy(), segments)
        total += len(keep)
    pq = preds.evaluate(split)
    return {"pq": pq, "pred_json": str(preds.out_dir / "panoptic.json"), "num_masks": total}
