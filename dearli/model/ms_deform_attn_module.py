"""Multi-scale deformable attention layer (projections around :func:`dearli.ops.ms_deform_attn`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dearli.ops.ms_deform_attn import ms_deform_attn, spatial_shapes_list


class MSDeformAttn(nn.Module):
    """Each query predicts, per head and level, ``n_points`` sampling offsets around its reference
    point and a softmax over the ``n_levels·n_points`` samples.

    Args:
        d_model: query / value width (divisible by ``n_heads``).
        n_levels: feature levels the value covers.
        n_heads: attention heads.
        n_points: sampling points per head and level.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR initialisation: offsets start as rays in ``n_heads`` directions (point k at
        distance k+1 pixels), attention starts uniform, projections Xavier."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        direction = torch.stack([angles.cos(), angles.sin()], -1)
        # Scale so the larger component is exactly 1: the first point lands on a neighbouring pixel.
        direction = direction / direction.abs().max(-1, keepdim=True).values
        distance = torch.arange(1, self.n_points + 1, dtype=torch.float32)
        grid = direction[:, None, None, :] * distance[None, None, :, None]  # heads×1×points×2
        grid = grid.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value_input: torch.Tensor,
                spatial_shapes: torch.Tensor | Sequence[Sequence[int]],
                padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from queries to multi-scale values.

        Args:
            query: N×Lq×C query features (position embedding already added).
            reference_points: N×Lq×L×2 normalised ``(x, y)`` in [0, 1] per level.
            value_input: N×S×C flattened features of all levels (S = Σ H_l·W_l).
            spatial_shapes: L×2 ``(H, W)`` per level.
            padding_mask: optional N×S, True where the value is padding (read as zero).

        Returns:
            N×Lq×C.
        """
        shapes = spatial_shapes_list(spatial_shapes)
        if len(shapes) != self.n_levels:
            raise ValueError(f"expected {self.n_levels} levels, got spatial_shapes {shapes}")
        n, lq, _ = query.shape
        s = value_input.shape[1]
        value = self.value_proj(value_input)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(n, s, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels * self.n_points)
        weights = F.softmax(weights, -1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        # Offsets are in pixels of each level; (W, H) turns them into normalised (x, y).
        normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype, device=query.device)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        return self.output_proj(ms_deform_attn(value, shapes, locations, weights))
