"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch.

Each query gathers, for every head, a handful of bilinearly sampled values from every feature
level and mixes them with its attention weights. The compiled CUDA kernel of the original work is
replaced by one ``grid_sample`` per level, which is exact (same bilinear, zero padding and
``align_corners=False`` conventions) and fast enough for the three levels Mask2Former uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def spatial_shapes_list(spatial_shapes: torch.Tensor | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """``spatial_shapes`` (L×2 tensor or pairs) as a list of ``(H, W)`` Python ints."""
    if isinstance(spatial_shapes, torch.Tensor):
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
            raise ValueError(f"spatial_shapes must be L×2 (H, W), got shape {tuple(spatial_shapes.shape)}")
        spatial_shapes = spatial_shapes.tolist()
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    if any(h <= 0 or w <= 0 for h, w in shapes):
        raise ValueError(f"spatial_shapes must be positive, got {shapes}")
    return shapes


def _check_shapes(value: torch.Tensor, shapes: list[tuple[int, int]], sampling_locations: torch.Tensor,
                  attention_weights: torch.Tensor) -> None:
    if value.dim() != 4:
        raise ValueError(f"value must be N×S×M×D, got shape {tuple(value.shape)}")
    n, s, m, _ = value.shape
    if s != sum(h * w for h, w in shapes):
        raise ValueError(f"value has S={s} positions but spatial_shapes {shapes} cover "
                         f"{sum(h * w for h, w in shapes)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError("sampling_locations must be N×Lq×M×L×P×2, got shape "
                         f"{tuple(sampling_locations.shape)}")
    ln, lq, lm, ll, lp, _ = sampling_locations.shape
    if (ln, lm, ll) != (n, m, len(shapes)):
        raise ValueError(f"sampling_locations {tuple(sampling_locations.shape)} do not match value "
                         f"{tuple(value.shape)} and {len(shapes)} levels")
    if tuple(attention_weights.shape) != (n, lq, m, ll, lp):
        raise ValueError(f"attention_weights must be {(n, lq, m, ll, lp)}, got {tuple(attention_weights.shape)}")


def ms_deform_attn(value: torch.Tensor, spatial_shapes: torch.Tensor | Sequence[Sequence[int]],
                   sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Sample and mix multi-scale values.

    Args:
        value: N×S×M×D per-head values of all levels, flattened row-major level after level
            (S = Σ H_l·W_l).
        spatial_shapes: L×2 ``(H, W)`` of each level (tensor or sequence of pairs).
        sampling_locations: N×Lq×M×L×P×2 normalised ``(x, y)`` in [0, 1]; (0, 0) is the top-left
            corner of the top-left pixel. Points outside read zeros.
        attention_weights: N×Lq×M×L×P mixing weights (normally a softmax over L·P).

    Returns:
        N×Lq×(M·D) with heads concatenated head-major.
    """
    shapes = spatial_shapes_list(spatial_shapes)
    _check_shapes(value, shapes, sampling_locations, attention_weights)
    n, _, m, d = value.shape
    _, lq, _, _, p, _ = sampling_locations.shape
    # grid_sample wants [-1, 1] coordinates and one batch entry per (image, head).
    grids = (2.0 * sampling_locations - 1.0).transpose(1, 2).flatten(0, 1)  # (N·M)×Lq×L×P×2
    weights = attention_weights.transpose(1, 2).flatten(0, 1)  # (N·M)×Lq×L×P
    per_level = value.split([h * w for h, w in shapes], dim=1)
    output = None
    for level, (h, w) in enumerate(shapes):
        # N×HW×M×D -> (N·M)×D×H×W
        value_l = per_level[level].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        sampled = F.grid_sample(value_l, grids[:, :, level], mode="bilinear", padding_mode="zeros",
                                align_corners=False)  # (N·M)×D×Lq×P
        # Accumulating level by level avoids materialising all L·P samples at once.
        mixed = (sampled * weights[:, None, :, level]).sum(-1)  # (N·M)×D×Lq
        output = mixed if output is None else output + mixed
    return output.view(n, m * d, lq).transpose(1, 2).contiguous()
