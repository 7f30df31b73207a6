"""Write a COCO panoptic prediction set (PNGs + JSON) and score it against a split's ground truth."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dearli.data.coco_format import id2rgb
from dearli.errors import DataError


class PredictionSet:
    """``out_dir/panoptic/<stem>.png`` + ``out_dir/panoptic.json`` (dataset category ids).

    Refuses a non-empty ``out_dir/panoptic`` so earlier predictions are never overwritten.
    """

    def __init__(self, out_dir: str | Path, categories: Any):
        self.out_dir = Path(out_dir)
        self.pan_dir = self.out_dir / "panoptic"
        if self.pan_dir.exists() and any(self.pan_dir.iterdir()):
            raise DataError(self.pan_dir, "prediction directory is not empty; refusing to overwrite it")
        self.pan_dir.mkdir(parents=True, exist_ok=True)
        self.categories = categories
        self.annotations: list[dict] = []

    def add(self, record: Any, panoptic: np.ndarray, segments: list[dict]) -> None:
        """panoptic: H×W segment ids (0 = unassigned); segments: {"id", "category_id" (contiguous), "isthing"}."""
        file_name = f"{record.stem}.png"
        Image.fromarray(id2rgb(panoptic)).save(self.pan_dir / file_name)
        infos = [{"id": int(s["id"]), "category_id": self.categories.to_dataset_id(int(s["category_id"])),
                  "isthing": int(bool(s["isthing"])), "iscrowd": 0} for s in segments]
        self.annotations.append({"image_id": record.image_id, "file_name": file_name, "segments_info": infos})

    def finish(self) -> Path:
        path = self.out_dir / "panoptic.json"
        path.write_text(json.dumps({"annotations": self.annotations,
                                    "categories": [c.to_dict() for c in self.categories.categories]}))
        return path

    def evaluate(self, split: Any) -> dict:
        """Write the JSON and return ``pq_compute``'s result against ``split``'s ground truth."""
        from dearli.evaluation.pq import pq_compute

        pred_json = self.finish()
        gt_dir = split.records[0].panoptic_path.parent
        return pq_compute(split.json_path, gt_dir, pred_json, self.pan_dir, progress=False)


def pq_line(pq: dict) -> str:
    """One-line PQ summary in percent."""
    return (f"PQ {100 * pq['All']['pq']:.2f}  SQ {100 * pq['All']['sq']:.2f}  RQ {100 * pq['All']['rq']:.2f}  "
            f"PQ_th {100 * pq['Things']['pq']:.2f}  PQ_st {100 * pq['Stuff']['pq']:.2f}")
