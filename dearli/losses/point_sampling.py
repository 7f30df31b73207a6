"""Point sampling for mask losses (PointRend style).

Mask losses are computed on a few thousand points per mask instead of on every pixel: this keeps
memory independent of the mask resolution and lets predictions (1/4 of the input) and targets (full
input resolution) be compared without resizing either, because points live in normalised [0, 1]²
coordinates shared by both.

Coordinates are ``(x, y)`` pairs: x runs along the width, y along the height, (0, 0) is the top-left
corner of the top-left pixel and (1, 1) the bottom-right corner of the bottom-right pixel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def point_sample(input: torch.Tensor, coords: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """Bilinearly sample ``input`` (B×C×H×W) at ``coords`` (B×P×2, (x, y) in [0, 1]) -> B×C×P.

    ``align_corners=False`` because the coordinates refer to pixel areas, not pixel centres: the same
    normalised point then means the same image location at every resolution. Points closer than half a
    pixel to the border blend with ``padding_mode`` ("zeros" like the reference implementation).
    """
    if input.dim() != 4 or coords.dim() != 3 or coords.shape[-1] != 2:
        raise ValueError(f"point_sample expects B×C×H×W input and B×P×2 coords, got {tuple(input.shape)} "
                         f"and {tuple(coords.shape)}")
    grid = (2.0 * coords - 1.0).unsqueeze(2).to(input.dtype)  # B×P×1×2 in grid_sample's [-1, 1]
    out = F.grid_sample(input, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    return out.squeeze(3)


def calculate_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of binary mask logits: ``-|logits|``, highest where the prediction is closest to 0.5."""
    return -logits.abs()


def uncertain_point_coords(
    logits: torch.Tensor,
    uncertainty_fn: Callable[[torch.Tensor], torch.Tensor],
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
) -> torch.Tensor:
    """Randomised importance sampling of points: B×1×H×W logits -> B×P×2 coords in [0, 1].

    Draws ``num_points * oversample_ratio`` uniform candidates per mask, keeps the
    ``importance_sample_ratio * num_points`` most uncertain of them (by ``uncertainty_fn`` on the
    sampled logits, B×1×N -> B×1×N) and fills the rest with fresh uniform points, so the loss
    concentrates on mask boundaries without ignoring the rest of the image.
    """
    if oversample_ratio < 1 or not 0.0 <= importance_sample_ratio <= 1.0:
        raise ValueError(f"need oversample_ratio >= 1 and importance_sample_ratio in [0, 1], got "
                         f"{oversample_ratio} and {importance_sample_ratio}")
    batch = logits.shape[0]
    device = logits.device
    num_candidates = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    candidates = torch.rand(batch, num_candidates, 2, device=device)
    uncertainty = uncertainty_fn(point_sample(logits, candidates))[:, 0, :]  # B×N
    top = uncertainty.topk(num_uncertain, dim=1).indices  # B×k
    chosen = candidates.gather(1, top.unsqueeze(-1).expand(-1, -1, 2))
    if num_random > 0:
        chosen = torch.cat([chosen, torch.rand(batch, num_random, 2, device=device)], dim=1)
    return chosen
