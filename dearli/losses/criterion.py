"""Mask2Former set criterion: Hungarian matching, then class CE and point-sampled mask BCE + dice.

Target format (one dict per image, ``len(targets) == B``):
    "labels": (N,) int64 class ids in [0, K) — ignored (may be anything) when the class weight is 0;
    "masks":  N×H×W bool/float binary masks.

Padding: predictions cover the whole padded image batch (at 1/4 resolution), and points are drawn in
coordinates normalised to that extent. Target masks must therefore cover the same padded extent: the
caller pads every image's masks with zeros (bottom/right) to the padded batch size, H×W, the same for
all images of the batch. H×W may be the input resolution; the predictions need not be upsampled.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dearli.config_model import LossConfig
from dearli.errors import ConfigError, DataError
from dearli.losses.mask_losses import dice_loss, sigmoid_bce_loss
from dearli.losses.matcher import HungarianMatcher, Indices
from dearli.losses.point_sampling import calculate_uncertainty, point_sample, uncertain_point_coords

Targets = list[dict[str, torch.Tensor]]


class SetCriterion(nn.Module):
    """Weighted Mask2Former losses on the final and (deep supervision) every auxiliary prediction.

    ``forward`` returns WEIGHTED losses: "loss_ce", "loss_mask", "loss_dice" for the final output and
    the same names suffixed "_0", "_1", ... for ``outputs["aux_outputs"][i]``, each with its own matching
    and the same weights. With ``cfg.class_weight == 0`` training is class-agnostic (DeWa): the matcher
    must ignore classes, and "loss_ce*" is computed against a placeholder class and multiplied by 0, as
    upstream does. So the class head gets zero gradients rather than none: AdamW still decays it, and
    the head entering the Mean-Teacher stage is upstream's (a dropped term would leave it untouched).

    With ``label_sets`` (K×(K+1) bool) a matched target of class c is right when the query names any class
    of row c: its class term is -log of the probability mass on that set (identity rows: the plain CE).
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, cfg: LossConfig,
                 label_sets: torch.Tensor | None = None):
        super().__init__()
        if num_classes <= 0:
            raise ConfigError(f"num_classes: must be positive, got {num_classes}")
        self.class_agnostic = cfg.class_weight == 0
        if self.class_agnostic and getattr(matcher, "cost_class", 0) != 0:
            raise ConfigError("model.loss.class_weight is 0 (class-agnostic) but the matcher uses a class cost")
        self.num_classes = num_classes
        self.matcher = matcher
        self.cfg = cfg
        self.weights = {"loss_ce": cfg.class_weight, "loss_mask": cfg.mask_weight, "loss_dice": cfg.dice_weight}
        # The void ("no object") class is the last logit; most queries are void, so it is down-weighted.
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = cfg.no_object_weight
        self.register_buffer("empty_weight", empty_weight)
        full_sets = None
        if label_sets is not None:
            if self.class_agnostic or tuple(label_sets.shape) != (num_classes, num_classes + 1):
                raise ConfigError(f"label sets {tuple(label_sets.shape)} need a class loss and shape "
                                  f"{num_classes}×{num_classes + 1}")
            void_row = torch.zeros(1, num_classes + 1, dtype=torch.bool)
            void_row[0, -1] = True
            full_sets = torch.cat([label_sets.bool(), void_row])  # (K+1)×(K+1): void accepts void only
        self.register_buffer("label_sets", full_sets)

    def forward(self, outputs: dict, targets: Targets) -> dict[str, torch.Tensor]:
        """outputs: "pred_logits" B×Q×(K+1), "pred_masks" B×Q×h×w, optional "aux_outputs" (list of such
        dicts). targets: see the module docstring. Returns the dict of weighted scalar losses."""
        self._check_targets(outputs, targets)
        num_masks = self.num_masks(targets, outputs["pred_masks"].device)
        losses = self._losses(outputs, targets, num_masks, suffix="")
        if self.cfg.deep_supervision:
            for i, aux in enumerate(outputs.get("aux_outputs", ())):
                losses.update(self._losses(aux, targets, num_masks, suffix=f"_{i}"))
        return losses

    def _losses(self, outputs: dict, targets: Targets, num_masks: float, suffix: str) -> dict[str, torch.Tensor]:
        indices = self.matcher(outputs, targets)
        losses = {"loss_ce": self.loss_labels(outputs, targets, indices)}
        losses["loss_mask"], losses["loss_dice"] = self.loss_masks(outputs, targets, indices, num_masks)
        return {f"{name}{suffix}": self.weights[name] * value for name, value in losses.items()}

    def loss_labels(self, outputs: dict, targets: Targets, indices: Indices) -> torch.Tensor:
        """Unweighted CE over K+1 classes: matched queries -> their target class, the rest -> void.

        Class-agnostic, every matched query's target is class 0 (the labels are ignored; the term is
        weighted by 0 and only keeps the class head in the graph) and K is the logits' own.
        """
        logits = outputs["pred_logits"].float()  # B×Q×(K+1)
        num_classes = logits.shape[-1] - 1
        target_classes = torch.full(logits.shape[:2], num_classes, dtype=torch.int64, device=logits.device)
        batch_idx, query_idx = _prediction_index(indices)
        matched = [torch.zeros_like(tgt) if self.class_agnostic else t["labels"][tgt]
                   for t, (_, tgt) in zip(targets, indices)]
        target_classes[batch_idx.to(logits.device), query_idx.to(logits.device)] = (
            torch.cat(matched).to(logits.device))
        weight = self.empty_weight
        if weight.numel() != num_classes + 1:  # class-agnostic with another vocabulary size
            weight = torch.ones(num_classes + 1, device=logits.device)
            weight[-1] = self.cfg.no_object_weight
        if weight[-1] == 0 and batch_idx.numel() == 0:
            # Nothing matched and "no object" weighs nothing: a zero loss (the weighted mean would be 0/0),
            # still tied to the graph for distributed data parallel.
            return logits.sum() * 0.0
        if self.label_sets is None:
            return F.cross_entropy(logits.transpose(1, 2), target_classes, weight=weight)
        # The same weighted mean as cross_entropy, over -log of the mass on each target's accepted set.
        accepted = self.label_sets[target_classes]  # B×Q×(K+1)
        nll = -torch.logsumexp(logits.log_softmax(-1).masked_fill(~accepted, float("-inf")), dim=-1)
        w = weight[target_classes]
        return (w * nll).sum() / w.sum()

    def loss_masks(self, outputs: dict, targets: Targets, indices: Indices,
                   num_masks: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Unweighted (BCE, dice) of matched masks on uncertainty-sampled points, summed / num_masks."""
        pred_masks = outputs["pred_masks"]
        batch_idx, query_idx = _prediction_index(indices)
        if batch_idx.numel() == 0:
            # No target anywhere: zero losses still tied to the graph so every parameter gets a (zero)
            # gradient, which distributed data parallel requires.
            zero = pred_masks.sum() * 0.0
            return zero, zero.clone()
        src = pred_masks[batch_idx.to(pred_masks.device), query_idx.to(pred_masks.device)][:, None]  # M×1×h×w
        with torch.no_grad():
            coords = uncertain_point_coords(src, calculate_uncertainty, self.cfg.num_points,
                                            self.cfg.oversample_ratio, self.cfg.importance_sample_ratio)
            labels = self._sample_targets(targets, indices, coords)  # M×P
        point_logits = point_sample(src, coords)[:, 0].float()  # M×P
        return sigmoid_bce_loss(point_logits, labels, num_masks), dice_loss(point_logits, labels, num_masks)

    @staticmethod
    def _sample_targets(targets: Targets, indices: Indices, coords: torch.Tensor) -> torch.Tensor:
        """Sample matched target masks at their own resolution: M×P×2 coords -> M×P float labels."""
        chunks, start = [], 0
        for target, (_, tgt_idx) in zip(targets, indices):
            if tgt_idx.numel() == 0:
                continue
            masks = target["masks"][tgt_idx.to(target["masks"].device)]
            masks = masks.to(device=coords.device, dtype=torch.float32)[:, None]  # n×1×H×W
            chunks.append(point_sample(masks, coords[start:start + len(tgt_idx)])[:, 0])
            start += len(tgt_idx)
        return torch.cat(chunks)

    @staticmethod
    def num_masks(targets: Targets, device: torch.device) -> float:
        """Targets in the batch, averaged over workers when a process group exists, at least 1."""
        count = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        if dist.is_available() and dist.is_initialized():
            # Every worker divides by the same number, so the summed gradients equal a global average.
            dist.all_reduce(count)
            count = count / dist.get_world_size()
        return max(count.item(), 1.0)

    def _check_targets(self, outputs: dict, targets: Targets) -> None:
        pred_masks = outputs["pred_masks"]
        if len(targets) != pred_masks.shape[0]:
            raise DataError(None, f"got {len(targets)} targets for a batch of {pred_masks.shape[0]} images")
        if not self.class_agnostic and outputs["pred_logits"].shape[-1] != self.num_classes + 1:
            raise ValueError(f"pred_logits has {outputs['pred_logits'].shape[-1]} classes, expected "
                             f"{self.num_classes} + 1 (void)")
        sizes = set()
        for i, t in enumerate(targets):
            masks, labels = t.get("masks"), t.get("labels")
            if masks is None or labels is None:
                raise DataError(None, f"target {i}: needs 'masks' and 'labels'")
            if masks.dim() != 3 or labels.dim() != 1 or masks.shape[0] != labels.shape[0]:
                raise DataError(None, f"target {i}: masks {tuple(masks.shape)} must be N×H×W with one label "
                                      f"each, labels {tuple(labels.shape)}")
            sizes.add(tuple(masks.shape[-2:]))
        if len(sizes) > 1:
            raise DataError(None, f"target masks have different sizes {sorted(sizes)}: pad every image's masks "
                                  "with zeros to the padded batch size")
        if not self.class_agnostic:
            labels = torch.cat([t["labels"] for t in targets])
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise DataError(None, f"target labels must lie in [0, {self.num_classes}), got "
                                      f"[{int(labels.min())}, {int(labels.max())}]")


def _prediction_index(indices: Indices) -> tuple[torch.Tensor, torch.Tensor]:
    """(image index, query index) of every matched prediction, images in order."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    query_idx = torch.cat([src for src, _ in indices])
    return batch_idx, query_idx


def total_loss(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the (already weighted) losses returned by :class:`SetCriterion`."""
    if not losses:
        raise ValueError("no losses to sum")
    return torch.stack([value for value in losses.values()]).sum()


def thing_label_sets(num_classes: int, thing_ids: Sequence[int]) -> torch.Tensor:
    """K×(K+1) bool label sets where a thing target accepts any thing class and a stuff target its own."""
    sets = torch.zeros(num_classes, num_classes + 1, dtype=torch.bool)
    sets[torch.arange(num_classes), torch.arange(num_classes)] = True
    things = torch.as_tensor(list(thing_ids), dtype=torch.int64)
    if things.numel():
        sets[things[:, None], things[None, :]] = True
    return sets


def build_criterion(cfg: LossConfig, num_classes: int, label_sets: torch.Tensor | None = None) -> SetCriterion:
    """Matcher and criterion from the loss config; matching costs equal the loss weights."""
    matcher = HungarianMatcher(cost_class=cfg.class_weight, cost_mask=cfg.mask_weight,
                               cost_dice=cfg.dice_weight, num_points=cfg.num_points, label_sets=label_sets)
    return SetCriterion(num_classes, matcher, cfg, label_sets)
