"""Geometric ensemble of the decoder's (in-vocabulary) and CLIP's (zero-shot) class predictions.

For each query, with void dropped before each softmax:

    p_class = softmax(log(p_dec^(1-α) · p_clip^α)) · (1 - p_void),   p = [p_class, p_void]

where p_void comes from the decoder's full softmax (CLIP has no void). Since every DEARLi class is seen in
training, one weight α applies to all classes (FC-CLIP's separate weight for unseen classes is not needed).
The product is computed in log space, which is the same function but cannot underflow to log(0).

The paper fixes α; :func:`alpha_schedule` makes it a function of the training step or the label budget.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dearli.config_model import EnsembleConfig
from dearli.errors import ConfigError

# "budget" schedule: the smallest labeled fraction considered (COCO's 1/512 partition); at or below it
# the CLIP weight is alpha_clip_end, at full supervision it is alpha_clip, log-linear in between.
BUDGET_MIN_FRACTION = 1.0 / 512


def geometric_ensemble(mask_cls: torch.Tensor, clip_cls: torch.Tensor,
                       alpha_clip: float | torch.Tensor) -> torch.Tensor:
    """Decoder logits B×Q×(K+1) (void last) + CLIP logits B×Q×(K+1) or B×Q×K -> probabilities B×Q×(K+1).

    ``alpha_clip`` is the CLIP weight: a float, or a tensor broadcastable to B×Q×1 (e.g. 0 for queries
    whose mask is empty at the CLIP feature resolution). Rows of the result sum to 1, void last. The
    result is at least fp32 (fp64 stays fp64), computed with autocast off (see TextClassifier.forward).
    """
    num_classes = mask_cls.shape[-1] - 1
    if clip_cls.shape[-1] not in (num_classes, num_classes + 1) or clip_cls.shape[:-1] != mask_cls.shape[:-1]:
        raise ValueError(f"clip_cls {tuple(clip_cls.shape)} does not match mask_cls {tuple(mask_cls.shape)}")
    dtype = torch.promote_types(mask_cls.dtype, torch.float32)
    with torch.autocast(device_type=mask_cls.device.type, enabled=False):
        mask_cls = mask_cls.to(dtype)
        log_dec = F.log_softmax(mask_cls[..., :num_classes], dim=-1)
        log_clip = F.log_softmax(clip_cls[..., :num_classes].to(dtype), dim=-1)
        alpha = torch.as_tensor(alpha_clip, dtype=dtype, device=log_dec.device)
        class_probs = torch.softmax((1.0 - alpha) * log_dec + alpha * log_clip, dim=-1)
        void = torch.softmax(mask_cls, dim=-1)[..., num_classes:]
        return torch.cat([class_probs * (1.0 - void), void], dim=-1)


def alpha_schedule(cfg: EnsembleConfig, step: int, max_steps: int, labeled_fraction: float | None = None) -> float:
    """The CLIP weight α at ``step`` of ``max_steps``.

    - ``constant``: ``alpha_clip`` throughout (the paper's setting).
    - ``linear``: from ``alpha_clip`` at step 0 to ``alpha_clip_end`` at ``max_steps``.
    - ``budget``: independent of the step; ``alpha_clip`` at full supervision (fraction 1) and
      ``alpha_clip_end`` at ``BUDGET_MIN_FRACTION`` or fewer labels, linear in log(fraction) between.
      With ``alpha_clip_end > alpha_clip`` the CLIP prior weighs more when labels are scarce, where the
      decoder's classifier has seen fewer examples.
    """
    if cfg.schedule == "constant":
        return float(cfg.alpha_clip)
    if cfg.schedule == "linear":
        progress = min(max(step / max(max_steps, 1), 0.0), 1.0)
        return float(cfg.alpha_clip + (cfg.alpha_clip_end - cfg.alpha_clip) * progress)
    if cfg.schedule == "budget":
        if labeled_fraction is None or not 0.0 < labeled_fraction <= 1.0:
            raise ConfigError("model.ensemble.schedule=budget needs the labeled fraction in (0, 1], "
                              f"got {labeled_fraction!r}")
        scarcity = math.log(labeled_fraction) / math.log(BUDGET_MIN_FRACTION)
        scarcity = min(max(scarcity, 0.0), 1.0)
        return float(cfg.alpha_clip + (cfg.alpha_clip_end - cfg.alpha_clip) * scarcity)
    raise ConfigError(f"model.ensemble.schedule: unknown schedule {cfg.schedule!r}")
