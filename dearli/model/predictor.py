"""The test-time path of M2F-Lang: from an RGB image to a panoptic and a semantic prediction.

Used alike by evaluation, ``dearli predict``, batch pseudo-labelling and the Mean-Teacher teacher:

1. resize the shortest edge and pad to a multiple of 32 with the CLIP pixel mean (it normalises to 0,
   as Mask2Former pads after normalising);
2. backbone + pixel decoder + transformer decoder;
3. optionally the geometric ensemble of the decoder's classes with zero-shot CLIP on mask-pooled dense
   features (DEARLi's "ensemble in the teacher" when the teacher runs it);
4. mask upsampling to the wanted size, Mask2Former panoptic and semantic inference.

:func:`predict_image` does all four for one image of any size; :func:`predict_batch` runs 2-4 on a batch
that is already at its working size (the teacher's weak views), keeping per-segment confidences.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from dearli.config_model import ModelConfig
from dearli.model.ensemble import geometric_ensemble
from dearli.model.inference import (
    MASK2FORMER_RULE,
    PanopticRule,
    pad_to_multiple,
    panoptic_inference,
    postprocess_masks,
    resize_shortest_edge,
    semantic_inference,
)
from dearli.model.zero_shot import valid_pooling


@dataclass(frozen=True)
class Prediction:
    panoptic: np.ndarray  # H×W int32 segment ids, 0 = unassigned
    segments: list[dict]  # {"id", "isthing", "category_id" (contiguous), "score" (class probability)}
    semantic: np.ndarray  # H×W uint8 contiguous class ids
    extra: dict = field(default_factory=dict)


def class_scores(model: torch.nn.Module, outputs: dict, alpha_clip: float,
                 on_valid_mask: bool = False) -> tuple[torch.Tensor, bool]:
    """Per-query class scores B×Q×(K+1): decoder logits (``probs`` False) or ensembled probabilities (True).

    With ``on_valid_mask`` a query whose mask is empty on the CLIP feature grid gets CLIP weight 0.
    """
    if alpha_clip <= 0:
        return outputs["pred_logits"], False
    alpha: float | torch.Tensor = alpha_clip
    if on_valid_mask:
        valid = valid_pooling(outputs["pred_masks"], outputs["clip_vis_dense"].shape[-2:])
        alpha = alpha_clip * valid.unsqueeze(-1).to(outputs["pred_logits"].dtype)
    return geometric_ensemble(outputs["pred_logits"], model.zero_shot_logits(outputs), alpha), True


# Queries upsampled to the image's size at once by predict_image: its memory is O(this × H × W), not O(Q × H × W).
UPSAMPLE_CHUNK = 4


@torch.no_grad()
def predict_image(model: torch.nn.Module, image: np.ndarray, cfg: ModelConfig, thing_ids: tuple[int, ...],
                  alpha_clip: float | None = None, semantic: bool = True,
                  check: Callable[[], None] | None = None) -> Prediction:
    """Panoptic and semantic prediction of one H×W×3 uint8 RGB image, at the image's own size.

    ``alpha_clip`` is the CLIP weight of the geometric ensemble (default ``cfg.ensemble.alpha_clip``);
    0 uses the decoder's classifier alone. The panoptic map is decided at the image's size (Mask2Former's
    rule); ``semantic=False`` skips the semantic map (K×H×W scores), leaves ``Prediction.semantic`` empty
    and upsamples the masks :data:`UPSAMPLE_CHUNK` queries at a time (memory O(H·W), not O(Q·H·W)); both
    give the same panoptic map. ``check`` is called between the
    steps and may raise to stop the work (a labeling request whose client has gone).
    """
    model.eval()
    device = next(model.parameters()).device
    alpha = cfg.ensemble.alpha_clip if alpha_clip is None else alpha_clip
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(device)
    resized = resize_shortest_edge(x.float(), cfg.inference.test_short_side, cfg.inference.test_max_size)
    del x
    padded = pad_to_multiple(resized, cfg.inference.size_divisibility, model.backbone.pixel_mean)
    if check is not None:
        check()
    outputs = model(padded)
    scores, probs = class_scores(model, outputs, alpha, cfg.ensemble.on_valid_mask)

    def upsample(masks: torch.Tensor) -> torch.Tensor:
        return postprocess_masks(masks, padded.shape[-2:], resized.shape[-2:], image.shape[:2])

    semantic_map = np.zeros((0, 0), np.uint8)
    if semantic:  # the semantic map needs every mask at full size anyway: upsample them once, for both maps
        masks = upsample(outputs["pred_masks"][0])
        semantic_map = semantic_inference(scores[0], masks, probs=probs).argmax(0).to(torch.uint8).cpu().numpy()
        low, lazy = masks, None
    else:
        low, lazy = outputs["pred_masks"][0], upsample
    panoptic, segments = panoptic_inference(
        scores[0], low, thing_ids, cfg.inference.object_mask_threshold, cfg.inference.overlap_threshold,
        probs=probs, upsample=lazy, chunk=UPSAMPLE_CHUNK, check=check)
    return Prediction(panoptic.cpu().numpy(), segments, semantic_map)


@torch.no_grad()
def predict_batch(model: torch.nn.Module, images: torch.Tensor, cfg: ModelConfig, thing_ids: tuple[int, ...],
                  alpha_clip: float, rule: PanopticRule = MASK2FORMER_RULE) -> list[Prediction]:
    """Predictions of a batch of same-sized images at their own resolution (no test-time resize).

    Args:
        images: B×3×H×W RGB in [0, 255]; H and W multiples of ``cfg.inference.size_divisibility``.
        rule: the panoptic pixel hand-out (default Mask2Former's; the teacher may use its own).
    Returns:
        B predictions of size H×W; each segment carries its class probability as ``score``.
    """
    model.eval()
    outputs = model(images.float())
    scores, probs = class_scores(model, outputs, alpha_clip, cfg.ensemble.on_valid_mask)
    size = tuple(images.shape[-2:])
    masks = F.interpolate(outputs["pred_masks"].float(), size=size, mode="bilinear", align_corners=False)
    return [_infer(scores[b], probs, masks[b], cfg, thing_ids, rule) for b in range(images.shape[0])]


def _infer(scores: torch.Tensor, probs: bool, masks: torch.Tensor, cfg: ModelConfig,
           thing_ids: tuple[int, ...], rule: PanopticRule = MASK2FORMER_RULE) -> Prediction:
    """Q×(K+1) scores + Q×H×W mask logits -> :class:`Prediction`."""
    panoptic, segments = panoptic_inference(scores, masks, thing_ids, cfg.inference.object_mask_threshold,
                                            cfg.inference.overlap_threshold, probs=probs, rule=rule)
    semantic = semantic_inference(scores, masks, probs=probs).argmax(0)
    return Prediction(panoptic.cpu().numpy(), segments, semantic.to(torch.uint8).cpu().numpy())
