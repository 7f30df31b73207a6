"""Hungarian matching of predicted masks to target masks (one-to-one, per image)."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from dearli.errors import ConfigError
from dearli.losses.mask_losses import pairwise_dice, pairwise_sigmoid_bce
from dearli.losses.point_sampling import point_sample

Indices = list[tuple[torch.Tensor, torch.Tensor]]


class HungarianMatcher(nn.Module):
    """Assigns each target to one query by minimising class + mask + dice cost.

    cost = cost_class·(-p[target class]) + cost_mask·BCE + cost_dice·dice, where the mask costs are
    computed on ``num_points`` uniform random points drawn once per image and shared by every prediction
    and every target of that image (so all pairs are compared on the same locations). With
    ``cost_class == 0`` the class logits are never read: matching is class-agnostic, as in the SAM
    warm-up where targets carry no meaningful class. With ``label_sets`` (K×(K+1) bool, see
    :func:`dearli.losses.criterion.thing_label_sets`) a target of class c accepts every class of row c, and
    the class cost is minus the probability mass on that set.
    """

    def __init__(self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0,
                 num_points: int = 12544, label_sets: torch.Tensor | None = None):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ConfigError("model.loss: class, mask and dice weights cannot all be 0 (nothing to match on)")
        if num_points <= 0:
            raise ConfigError(f"model.loss.num_points: must be positive, got {num_points}")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points
        self.label_sets = label_sets

    @torch.no_grad()
    def forward(self, outputs: dict[str, torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> Indices:
        """Match queries to targets image by image.

        Args:
            outputs: "pred_masks" B×Q×h×w mask logits and, unless class-agnostic, "pred_logits" B×Q×(K+1).
            targets: B dicts with "labels" (N,) int64 and "masks" N×H×W (bool or float); H×W may differ
                from h×w, points are in normalised coordinates.
        Returns:
            B pairs (pred_idx, tgt_idx) of int64 CPU tensors of length min(Q, N): query pred_idx[i] is
            matched to target tgt_idx[i]. Images without targets give two empty tensors.
        """
        pred_masks = outputs["pred_masks"]
        if len(targets) != pred_masks.shape[0]:
            raise ValueError(f"got {len(targets)} targets for a batch of {pred_masks.shape[0]} predictions")
        return [self._match_image(outputs, targets[b], b) for b in range(pred_masks.shape[0])]

    def _match_image(self, outputs: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                     b: int) -> tuple[torch.Tensor, torch.Tensor]:
        pred_masks = outputs["pred_masks"][b]  # Q×h×w
        tgt_masks = target["masks"]
        num_targets = tgt_masks.shape[0]
        if num_targets == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return empty, empty.clone()
        device = pred_masks.device
        # Matching is sensitive to small cost differences: compute it in float32 even under AMP.
        with torch.autocast(device_type=device.type, enabled=False):
            coords = torch.rand(1, self.num_points, 2, device=device)
            # Queries (and targets) as channels of one image: one grid_sample per side.
            pred_points = point_sample(pred_masks[None].float(), coords)[0]  # Q×P
            tgt_points = point_sample(tgt_masks[None].to(device=device, dtype=torch.float32), coords)[0]
            cost = self.cost_mask * pairwise_sigmoid_bce(pred_points, tgt_points)
            cost = cost + self.cost_dice * pairwise_dice(pred_points, tgt_points)
            if self.cost_class != 0:
                probs = outputs["pred_logits"][b].float().softmax(-1)  # Q×(K+1)
                if self.label_sets is not None:  # each class's accepted mass: Q×K
                    probs = probs @ self.label_sets.to(device=device, dtype=probs.dtype).T
                # -p[class] rather than the NLL: bounded, so it cannot swamp the mask costs.
                cost = cost - self.cost_class * probs[:, target["labels"].to(device)]
        cost = cost.cpu()
        if not torch.isfinite(cost).all():
            raise FloatingPointError("matching cost contains NaN or Inf: the predictions have diverged")
        pred_idx, tgt_idx = linear_sum_assignment(cost.numpy())
        return torch.as_tensor(pred_idx, dtype=torch.int64), torch.as_tensor(tgt_idx, dtype=torch.int64)

    def extra_repr(self) -> str:
        return (f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, cost_dice={self.cost_dice}, "
                f"num_points={self.num_points}")
