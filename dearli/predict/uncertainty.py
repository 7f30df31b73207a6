"""How unsure a model is about an image: the signals ``dearli suggest`` ranks unlabeled images by.

M2F-Lang classifies every query twice: the decoder's text classifier and zero-shot CLIP on the query's
mask-pooled dense feature. Where the two disagree, the model is unsure of the class; where the ensemble's
best class score is low, it is unsure as well. Both are averaged over the image's confident masks, each
weighted by its area, so one large unsure region counts more than a speck.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dearli.config_model import ModelConfig
from dearli.model.inference import pad_to_multiple, resize_shortest_edge
from dearli.model.predictor import class_scores

SCORES = ("combined", "disagreement", "low_score")


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats, in [0, ln 2]) of distributions ...×K -> ...."""
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor) -> torch.Tensor:
        return (a * (a.clamp_min(1e-12).log() - m.clamp_min(1e-12).log())).sum(-1)

    return 0.5 * (kl(p) + kl(q))


def query_signals(decoder_logits: torch.Tensor, clip_logits: torch.Tensor, ensemble: torch.Tensor,
                  masks: torch.Tensor) -> dict[str, float]:
    """One image's signals from its Q queries.

    Args:
        decoder_logits: Q×(K+1) (void last); clip_logits: Q×(K+1) or Q×K; ensemble: Q×(K+1) probabilities;
        masks: Q×H×W mask logits.
    Returns:
        {"disagreement": area-weighted JS divergence between the decoder's and CLIP's class distributions
        (ln 2 = total disagreement), "low_score": 1 - area-weighted best class probability of the ensemble,
        "segments": queries counted}; queries predicting void or with an empty mask do not count.
    """
    num_classes = decoder_logits.shape[-1] - 1
    p_dec = F.softmax(decoder_logits[..., :num_classes].float(), dim=-1)
    p_clip = F.softmax(clip_logits[..., :num_classes].float(), dim=-1)
    best, label = ensemble.float().max(-1)
    area = (masks.sigmoid() >= 0.5).flatten(1).sum(1).float()
    keep = label.ne(num_classes) & (area > 0)
    if not bool(keep.any()):
        return {"disagreement": 0.0, "low_score": 1.0, "segments": 0}
    weight = area[keep] / area[keep].sum()
    return {"disagreement": float((js_divergence(p_dec[keep], p_clip[keep]) * weight).sum()),
            "low_score": float(1.0 - (best[keep] * weight).sum()), "segments": int(keep.sum())}


def combined_score(signals: dict[str, float]) -> float:
    """Both signals on one scale: disagreement / ln 2 and low score are each in [0, 1]; their mean."""
    return 0.5 * (signals["disagreement"] / float(np.log(2.0)) + signals["low_score"])


@torch.no_grad()
def image_signals(model: torch.nn.Module, image: np.ndarray, cfg: ModelConfig, alpha_clip: float) -> dict[str, float]:
    """The signals of one H×W×3 uint8 RGB image, seen at the test-time scale, with "combined" added."""
    model.eval()
    device = next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().to(device)
    resized = resize_shortest_edge(x, cfg.inference.test_short_side, cfg.inference.test_max_size)
    outputs = model(pad_to_multiple(resized, cfg.inference.size_divisibility, model.backbone.pixel_mean))
    ensemble, probs = class_scores(model, outputs, alpha_clip, cfg.ensemble.on_valid_mask)
    ensemble = ensemble if probs else F.softmax(ensemble.float(), dim=-1)
    signals = query_signals(outputs["pred_logits"][0], model.zero_shot_logits(outputs)[0], ensemble[0],
                            outputs["pred_masks"][0])
    return {**signals, "combined": combined_score(signals)}
