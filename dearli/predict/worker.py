"""The pseudo-labelling worker: the teacher's test-time path on batches of images (no Ray here).

A :class:`~dearli.caches.workers.CacheWorker` like the cache workers, so it inherits their batch loop,
error table and commit protocol: per image it loads the RGB file, runs :func:`predict_image` (with the
zero-shot ensemble at the checkpoint's ``model.ensemble.alpha_clip`` unless told otherwise), drops
segments below ``min_score``, writes the panoptic PNG and returns the image's row; the batch's rows are
then committed as one part.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dearli.caches.records import DEFAULT_MAX_PIXELS
from dearli.caches.store import write_atomic
from dearli.caches.workers import CacheWorker
from dearli.data.coco_format import id2rgb
from dearli.data.panoptic import CategoryMap
from dearli.device import resolve_device
from dearli.model.predictor import predict_image
from dearli.predict.outputs import PANOPTIC_DIR, ROW_SCHEMA, keep_confident, segment_records


def model_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """The part of a checkpoint payload a predictor needs (no optimiser or scheduler state)."""
    return {key: payload[key] for key in ("model", "config", "step") if key in payload}


def load_predictor(checkpoint: str | Path | dict[str, Any], categories: CategoryMap,
                   device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any]:
    """(model in eval mode classifying ``categories``, its Config) from a checkpoint file or payload.

    The vocabulary is installed from ``categories`` (M2F-Lang classifies by text embeddings, so any
    class list works without retraining); the checkpoint only supplies the weights.
    """
    from dearli.model.m2f_lang import build_m2f_lang
    from dearli.training.checkpoint import load_checkpoint, restore

    payload = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint, device)
    cfg = payload["config"]
    model = build_m2f_lang(cfg.model, categories.synonyms)
    restore(model, payload)
    return model.to(device).eval(), cfg


def _device() -> str:
    return str(resolve_device())


def png_bytes(panoptic: np.ndarray) -> bytes:
    """H×W segment ids -> COCO panoptic PNG file contents."""
    buffer = io.BytesIO()
    Image.fromarray(id2rgb(panoptic)).save(buffer, format="PNG")
    return buffer.getvalue()


class PseudoLabelWorker(CacheWorker):
    """Panoptic pseudo-labels of images with a trained checkpoint and a (possibly new) class list.

    Args:
        checkpoint: a checkpoint file or its loaded payload (see :func:`model_payload`).
        classes: the class list as ``classes.json`` entries ({id, name, isthing}).
        min_score: segments with a lower class score are dropped (their pixels stay unlabeled).
        alpha_clip: CLIP weight of the ensemble; None = the checkpoint's ``model.ensemble.alpha_clip``.
    """

    schema = ROW_SCHEMA

    def __init__(self, cache_uri: str, run_id: str, checkpoint: str | dict[str, Any], classes: list[dict],
                 min_score: float = 0.0, alpha_clip: float | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
        super().__init__(cache_uri, run_id, max_pixels)
        self.categories = CategoryMap.from_dicts(classes, "class list")
        self.model, cfg = load_predictor(checkpoint, self.categories, _device())
        self.model_cfg = cfg.model
        self.min_score = float(min_score)
        self.alpha_clip = alpha_clip

    def process(self, item: dict[str, Any], image: np.ndarray) -> dict[str, Any]:
        pred = predict_image(self.model, image, self.model_cfg, self.categories.thing_ids, self.alpha_clip,
                             semantic=False)
        panoptic, segments = keep_confident(pred.panoptic, pred.segments, self.min_score)
        file_name = f"{item['stem']}.png"
        self._write_png(file_name, panoptic)
        return {"image_id": str(item["image_id"]), "stem": item["stem"], "image_path": item["image_path"],
                "height": int(image.shape[0]), "width": int(image.shape[1]), "file_name": file_name,
                "segments": segment_records(panoptic, segments, self.categories)}

    def _write_png(self, file_name: str, panoptic: np.ndarray) -> None:
        # A worker of a superseded (killed) run must not replace the PNG of the run that owns the output.
        self.store.require_lease(self.run_id)
        write_atomic(self.store.path(PANOPTIC_DIR, file_name), png_bytes(panoptic), self.store.fs)
