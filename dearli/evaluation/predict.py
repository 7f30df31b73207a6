"""Run a trained M2F-Lang model over a split, write COCO panoptic predictions, and score them.

Test-time path per image: resize the shortest edge, pad to a multiple of 32 with the CLIP pixel mean
(normalises to 0, as Mask2Former pads after normalising), forward, optionally ensemble the decoder's
classes with zero-shot CLIP, upsample masks to the original size, panoptic and semantic inference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dearli.config import ModelConfig
from dearli.data.coco_format import IGNORE_LABEL, id2rgb
from dearli.ensemble import geometric_ensemble
from dearli.errors import DataError
from dearli.inference import (
    pad_to_multiple,
    panoptic_inference,
    postprocess_masks,
    resize_shortest_edge,
    semantic_inference,
)


@dataclass(frozen=True)
class Prediction:
    panoptic: np.ndarray  # H×W int32 segment ids, 0 = unassigned
    segments: list[dict]  # {"id", "isthing", "category_id" (contiguous)}
    semantic: np.ndarray  # H×W uint8 contiguous class ids


@torch.no_grad()
def predict_image(model: torch.nn.Module, image: np.ndarray, cfg: ModelConfig, thing_ids: tuple[int, ...],
                  alpha_clip: float | None = None) -> Prediction:
    """Panoptic and semantic prediction of one H×W×3 uint8 RGB image.

    ``alpha_clip`` is the CLIP weight of the geometric ensemble (default ``cfg.ensemble.alpha_clip``);
    0 uses the decoder's classifier alone.
    """
    model.eval()
    device = next(model.parameters()).device
    alpha = cfg.ensemble.alpha_clip if alpha_clip is None else alpha_clip
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().to(device)
    resized = resize_shortest_edge(x, cfg.inference.test_short_side, cfg.inference.test_max_size)
    padded = pad_to_multiple(resized, cfg.inference.size_divisibility, model.backbone.pixel_mean)
    outputs = model(padded)
    if alpha > 0:
        scores, probs = geometric_ensemble(outputs["pred_logits"], model.zero_shot_logits(outputs), alpha)[0], True
    else:
        scores, probs = outputs["pred_logits"][0], False
    masks = postprocess_masks(outputs["pred_masks"][0], padded.shape[-2:], resized.shape[-2:], image.shape[:2])
    panoptic, segments = panoptic_inference(scores, masks, thing_ids, cfg.inference.object_mask_threshold,
                                            cfg.inference.overlap_threshold, probs=probs)
    semantic = semantic_inference(scores, masks, probs=probs).argmax(0)
    return Prediction(panoptic.cpu().numpy(), segments, semantic.to(torch.uint8).cpu().numpy())


def _write_prediction(pred: Prediction, record: Any, categories: Any, pan_dir: Path) -> dict:
    """Write the panoptic PNG; return its COCO annotation entry (dataset category ids)."""
    file_name = f"{record.stem}.png"
    Image.fromarray(id2rgb(pred.panoptic)).save(pan_dir / file_name)
    infos = [{"id": s["id"], "category_id": categories.to_dataset_id(s["category_id"]),
              "isthing": int(s["isthing"]), "iscrowd": 0} for s in pred.segments]
    return {"image_id": record.image_id, "file_name": file_name, "segments_info": infos}


def semantic_ground_truth(split: Any, record: Any) -> np.ndarray:
    """The H×W uint8 semantic map of a record: its semantic PNG, or derived from the panoptic GT."""
    if record.semantic_path is not None:
        return split.load_semantic(record)
    target = split.load_target(record)
    semantic = np.full(target.segment_map.shape, IGNORE_LABEL, dtype=np.uint8)
    for seg_id, label in zip(target.segment_ids, target.labels):
        semantic[target.segment_map == seg_id] = label
    return semantic


def evaluate_model(model: torch.nn.Module, cfg: ModelConfig, info: Any, split_name: str, out_dir: str | Path,
                   alpha_clip: float | None = None, progress: bool = True,
                   gt_cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Predict every image of a split into ``out_dir`` (COCO panoptic) and compute PQ and mIoU.

    ``gt_cache_dir`` keeps the decoded ground truth between evaluations of the same split (a run
    evaluates at every ``train.eval_every`` steps).

    Returns:
        {"summary": {"PQ", "SQ", "RQ", "PQ_th", "PQ_st", "mIoU"} in percent, "pq": full PQ dict,
         "semseg": full semantic-segmentation dict, "pred_json": path}
    """
    from dearli.evaluation.pq import pq_compute
    from dearli.evaluation.semseg import SemSegEvaluator

    out_dir = Path(out_dir)
    pan_dir = out_dir / "panoptic"
    if pan_dir.exists() and any(pan_dir.iterdir()):
        raise DataError(pan_dir, "prediction directory is not empty; refusing to overwrite earlier predictions")
    pan_dir.mkdir(parents=True, exist_ok=True)
    split = info.split(split_name)
    categories = split.categories
    semseg = SemSegEvaluator(categories.num_classes)
    annotations = []
    for record in tqdm(split.records, desc=f"predict {split_name}", disable=not progress, leave=False):
        pred = predict_image(model, split.load_image(record), cfg, categories.thing_ids, alpha_clip)
        annotations.append(_write_prediction(pred, record, categories, pan_dir))
        semseg.update(pred.semantic, semantic_ground_truth(split, record))
    pred_json = out_dir / "panoptic.json"
    pred_json.write_text(json.dumps({"annotations": annotations,
                                     "categories": [c.to_dict() for c in categories.categories]}))
    gt_dir = split.records[0].panoptic_path.parent
    pq = pq_compute(split.json_path, gt_dir, pred_json, pan_dir, progress=False, gt_cache_dir=gt_cache_dir)
    sem = semseg.compute()
    summary = {"PQ": 100 * pq["All"]["pq"], "SQ": 100 * pq["All"]["sq"], "RQ": 100 * pq["All"]["rq"],
               "PQ_th": 100 * pq["Things"]["pq"], "PQ_st": 100 * pq["Stuff"]["pq"], "mIoU": 100 * sem["miou"]}
    result = {"summary": summary, "pq": pq, "semseg": sem, "pred_json": str(pred_json)}
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2, default=str))
    return result
