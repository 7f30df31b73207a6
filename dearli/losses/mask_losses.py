"""Binary mask losses on sampled points: per-pair versions for the loss, all-pairs versions for matching.

All functions take mask logits and {0, 1} (or soft, from bilinear sampling) targets already sampled at
points, so shapes are N×P (masks × points).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Added to numerator and denominator of dice so that an empty target with an empty prediction costs 0
# and the gradient stays finite.
DICE_SMOOTH = 1.0


def sigmoid_bce_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Sigmoid BCE of matched pairs: N×P logits and targets -> scalar (mean over points, sum / num_masks)."""
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Soft dice loss of matched pairs: N×P logits and targets -> scalar (sum over masks / num_masks)."""
    probs = logits.sigmoid()
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    loss = 1 - (numerator + DICE_SMOOTH) / (denominator + DICE_SMOOTH)
    return loss.sum() / num_masks


def pairwise_sigmoid_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean point-wise sigmoid BCE of every prediction against every target: Q×P, N×P -> Q×N."""
    num_points = logits.shape[1]
    # BCE(x, t) = t·softplus(-x) + (1 - t)·softplus(x): linear in t, so all pairs are two matmuls.
    pos = F.softplus(-logits)
    neg = F.softplus(logits)
    return (pos @ targets.T + neg @ (1 - targets).T) / num_points


def pairwise_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft dice loss of every prediction against every target: Q×P, N×P -> Q×N."""
    probs = logits.sigmoid()
    numerator = 2 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + DICE_SMOOTH) / (denominator + DICE_SMOOTH)
