"""Class-agnostic mask generators behind the SAM cache.

A generator turns one RGB image into a list of :class:`MaskRecord`. Two implementations:

* :class:`SamGenerator` wraps segment_anything's automatic mask generator (a grid of point prompts,
  quality filtering, NMS) with DEARLi's settings;
* :class:`FelzenszwalbGenerator` is a classical graph-based segmentation (scikit-image) that needs no
  weights and runs anywhere, used as a CPU stand-in for pipelines and benchmarks.

Generators are built from a picklable :class:`GeneratorSpec` so that each worker of a distributed job
can construct its own copy once (model loading is the expensive part).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from dearli.config import CacheConfig
from dearli.errors import ConfigError, DataError, checkpoint_error

SAM_TYPES = ("vit_b", "vit_l", "vit_h", "tiny")  # "tiny": small random SAM for tests and benchmarks
GENERATOR_KINDS = ("sam", "felzenszwalb")
_DEFAULTS = CacheConfig()


@dataclass(frozen=True)
class MaskRecord:
    """One class-agnostic mask of an image.

    segmentation: H×W bool; area: pixel count; bbox: (x, y, w, h) in pixels;
    predicted_iou / stability_score: the generator's confidence (1.0 for generators without one).
    """

    segmentation: np.ndarray
    area: int
    bbox: tuple[float, float, float, float]
    predicted_iou: float
    stability_score: float


class MaskGenerator(Protocol):
    def generate(self, image: np.ndarray) -> list[MaskRecord]:
        """image: H×W×3 uint8 RGB -> masks, in no particular order."""
        ...


@dataclass(frozen=True)
class GeneratorSpec:
    """Everything needed to build a generator; recorded in the cache so reruns cannot mix settings."""

    kind: str = "sam"  # sam | felzenszwalb
    sam_type: str = _DEFAULTS.sam_type  # segment_anything registry key, or "tiny"
    sam_checkpoint: str = ""  # path of the SAM weights; "" only allowed for "tiny" (seeded random init)
    points_per_side: int = _DEFAULTS.points_per_side
    points_per_batch: int = _DEFAULTS.points_per_batch
    pred_iou_thresh: float = _DEFAULTS.pred_iou_thresh
    stability_score_thresh: float = _DEFAULTS.stability_score_thresh
    box_nms_thresh: float = 0.7
    min_mask_region_area: int = 0
    felzenszwalb_scale: float = 100.0
    felzenszwalb_sigma: float = 0.8
    felzenszwalb_min_size: int = 50
    device: str = "cpu"

    def validate(self) -> None:
        if self.kind not in GENERATOR_KINDS:
            raise ConfigError(f"generator: must be one of {', '.join(GENERATOR_KINDS)}, got {self.kind!r}")
        if self.kind == "sam":
            if self.sam_type not in SAM_TYPES:
                raise ConfigError(f"sam_type: must be one of {', '.join(SAM_TYPES)}, got {self.sam_type!r}")
            if self.sam_type != "tiny" and not self.sam_checkpoint:
                raise ConfigError(f"sam_checkpoint: SAM {self.sam_type} needs its weights (--sam-checkpoint)")
            if self.sam_checkpoint and not os.path.isfile(self.sam_checkpoint):
                raise DataError(self.sam_checkpoint, "SAM checkpoint file not found")
            if self.points_per_side < 1 or self.points_per_batch < 1:
                raise ConfigError("points_per_side / points_per_batch: must be positive")

    def check_weights(self) -> None:
        """Fail fast in the calling process when the SAM checkpoint does not hold ``sam_type``'s weights (the
        model is built on the meta device and the file memory-mapped: names and shapes are checked, no
        arithmetic), instead of in every cache actor."""
        if self.kind != "sam" or self.sam_type == "tiny":
            return
        import torch
        from segment_anything import sam_model_registry

        try:
            with torch.device("meta"):
                model = sam_model_registry[self.sam_type](checkpoint=None)
            try:
                state = torch.load(self.sam_checkpoint, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # files written before torch's zip format cannot be memory-mapped
                state = torch.load(self.sam_checkpoint, map_location="cpu", weights_only=True)
            model.load_state_dict(state, assign=True)
        except Exception as err:  # torch's unpickler and load_state_dict raise several types
            raise checkpoint_error(self.sam_checkpoint, f"SAM {self.sam_type} (--sam-type)", err) from err

    def settings(self) -> dict[str, Any]:
        """The settings that change the output (device does not)."""
        values = dataclasses.asdict(self)
        values.pop("device")
        return values


def _bbox_xywh(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return (0.0, 0.0, 0.0, 0.0)
    x0, y0 = int(xs.min()), int(ys.min())
    return (float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1))


class SamGenerator:
    """segment_anything's SamAutomaticMaskGenerator, configured from a :class:`GeneratorSpec`."""

    def __init__(self, spec: GeneratorSpec, model: Any | None = None):
        from segment_anything import SamAutomaticMaskGenerator, sam_model_registry

        if model is None:
            if spec.sam_type == "tiny":
                from dearli.caches.tiny_sam import build_tiny_sam

                model = build_tiny_sam(checkpoint=spec.sam_checkpoint or None)
            else:
                try:
                    model = sam_model_registry[spec.sam_type](checkpoint=spec.sam_checkpoint)
                except Exception as err:  # torch's unpickler and load_state_dict raise several types
                    raise checkpoint_error(spec.sam_checkpoint, f"SAM {spec.sam_type} (--sam-type)", err) from err
        model.to(spec.device).eval()
        self.spec = spec
        self._auto = SamAutomaticMaskGenerator(
            model,
            points_per_side=spec.points_per_side,
            points_per_batch=spec.points_per_batch,
            pred_iou_thresh=spec.pred_iou_thresh,
            stability_score_thresh=spec.stability_score_thresh,
            box_nms_thresh=spec.box_nms_thresh,
            min_mask_region_area=spec.min_mask_region_area,
            output_mode="binary_mask",
        )

    @property
    def predictor(self) -> Any:
        """The ``SamPredictor`` behind the generator: its ``model`` and resize ``transform`` (for benchmarks)."""
        return self._auto.predictor

    def generate(self, image: np.ndarray) -> list[MaskRecord]:
        import torch

        with torch.inference_mode():
            raw = self._auto.generate(image)
        out = []
        for item in raw:
            seg = np.asarray(item["segmentation"], dtype=bool)
            if not seg.any():  # random or weak models can emit empty masks; they carry no information
                continue
            out.append(MaskRecord(seg, int(seg.sum()), tuple(float(v) for v in item["bbox"]),
                                  float(item["predicted_iou"]), float(item["stability_score"])))
        return out


class FelzenszwalbGenerator:
    """Felzenszwalb-Huttenlocher graph segmentation: one mask per region, confidence 1.0."""

    def __init__(self, spec: GeneratorSpec):
        self.spec = spec

    def generate(self, image: np.ndarray) -> list[MaskRecord]:
        from skimage.segmentation import felzenszwalb

        labels = felzenszwalb(image, scale=self.spec.felzenszwalb_scale, sigma=self.spec.felzenszwalb_sigma,
                              min_size=self.spec.felzenszwalb_min_size)
        out = []
        for value in np.unique(labels):
            seg = labels == value
            out.append(MaskRecord(seg, int(seg.sum()), _bbox_xywh(seg), 1.0, 1.0))
        return out


def build_generator(spec: GeneratorSpec) -> MaskGenerator:
    """Construct the generator a spec describes (loads model weights for SAM)."""
    spec.validate()
    if spec.kind == "sam":
        return SamGenerator(spec)
    return FelzenszwalbGenerator(spec)
