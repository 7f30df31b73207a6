"""Evaluate a model during or after training: predict a split into COCO panoptic files, then score them.

Prediction is the model's test-time path (:mod:`dearli.model.predictor`); scoring reads the files back
(:mod:`dearli.evaluation`), exactly as ``dearli evaluate --semseg`` would score them.

Two mIoUs are reported, named apart:

- ``mIoU``: the model's semantic inference (per pixel, the class with the highest sum of class
  probability × mask probability over queries), against the semantic ground truth; what detectron2 and
  the DEARLi / Mask2Former papers report as mIoU.
- ``mIoU_pan``: the panoptic prediction turned into a semantic map (each segment's pixels get its class,
  unassigned pixels count as misses), against the panoptic ground truth (VOID ignored); what
  ``dearli evaluate --semseg`` reports. It is lower: the panoptic output drops low-scoring queries.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from dearli.config_model import ModelConfig
from dearli.data.coco_format import id2rgb
from dearli.errors import DataError
from dearli.evaluation.semseg import SemSegEvaluator, evaluate_semseg_panoptic, semantic_ground_truth
from dearli.model.predictor import Prediction, predict_image


def write_prediction(pred: Prediction, record: Any, categories: Any, pan_dir: Path) -> dict:
    """Write the panoptic PNG into ``pan_dir``; return its COCO annotation entry (dataset category ids)."""
    file_name = f"{record.stem}.png"
    Image.fromarray(id2rgb(pred.panoptic)).save(pan_dir / file_name)
    # The class score rides beside the COCO keys (evaluation ignores it; 'dearli review' sorts by it).
    infos = [{"id": s["id"], "category_id": categories.to_dataset_id(s["category_id"]),
              "isthing": int(s["isthing"]), "iscrowd": 0, "score": float(s.get("score", 1.0))} for s in pred.segments]
    return {"image_id": record.image_id, "file_name": file_name, "segments_info": infos}


def evaluate_model(model: torch.nn.Module, cfg: ModelConfig, info: Any, split_name: str, out_dir: str | Path,
                   alpha_clip: float | None = None, progress: bool = True,
                   gt_cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Predict every image of a split into ``out_dir`` (COCO panoptic) and compute PQ, mIoU and mIoU_pan.

    ``gt_cache_dir`` keeps the decoded ground truth between evaluations of the same split (a run
    evaluates at every ``train.eval_every`` steps).

    Returns:
        {"summary": {"PQ", "SQ", "RQ", "PQ_th", "PQ_st", "mIoU", "mIoU_pan"} in percent, "pq": full PQ dict,
         "semseg": semantic-inference dict (mIoU), "semseg_pan": panoptic-as-semantic dict (mIoU_pan),
         "pred_json": path}
    """
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
        annotations.append(write_prediction(pred, record, categories, pan_dir))
        semseg.update(pred.semantic, semantic_ground_truth(split, record))
    pred_json = out_dir / "panoptic.json"
    pred_json.write_text(json.dumps({"annotations": annotations,
                                     "categories": [c.to_dict() for c in categories.categories]}))
    gt_dir = split.records[0].panoptic_path.parent
    # One pass over the files gives PQ and the panoptic output's semantic confusion (mIoU_pan).
    sem_pan = evaluate_semseg_panoptic(split.json_path, gt_dir, pred_json, pan_dir, progress=False,
                                       gt_cache_dir=gt_cache_dir)
    pq = sem_pan.pop("pq")
    sem = semseg.compute()
    summary = {"PQ": 100 * pq["All"]["pq"], "SQ": 100 * pq["All"]["sq"], "RQ": 100 * pq["All"]["rq"],
               "PQ_th": 100 * pq["Things"]["pq"], "PQ_st": 100 * pq["Stuff"]["pq"], "mIoU": 100 * sem["miou"],
               "mIoU_pan": 100 * sem_pan["miou"]}
    result = {"summary": summary, "pq": pq, "semseg": sem, "semseg_pan": sem_pan, "pred_json": str(pred_json)}
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2, default=str))
    return result
