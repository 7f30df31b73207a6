"""Deformable-attention encoder layers used by the pixel decoder over res3-res5."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dearli.model.ms_deform_attn_module import MSDeformAttn


class DeformableEncoderLayer(nn.Module):
    """Post-norm block: multi-scale deformable self-attention, then a ReLU FFN.

    Args:
        d_model: token width.
        d_ffn: FFN hidden width.
        dropout: dropout after attention and inside / after the FFN.
        n_levels, n_heads, n_points: see :class:`MSDeformAttn`.
    """

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                spatial_shapes: list[tuple[int, int]]) -> torch.Tensor:
        """src, pos: N×S×C; reference_points: N×S×L×2 -> N×S×C."""
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes)
        src = self.norm1(src + self.dropout1(attended))
        hidden = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(hidden))


def reference_points(spatial_shapes: list[tuple[int, int]], batch: int, device: torch.device,
                     dtype: torch.dtype) -> torch.Tensor:
    """Pixel centres of every level as normalised ``(x, y)``: N×S×L×2.

    Every token looks at the same relative position on all levels (no padding, so the valid
    ratio is 1 everywhere).
    """
    points = []
    for h, w in spatial_shapes:
        ys = (torch.arange(h, dtype=dtype, device=device) + 0.5) / h
        xs = (torch.arange(w, dtype=dtype, device=device) + 0.5) / w
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), -1))
    ref = torch.cat(points, 0)  # S×2
    return ref[None, :, None, :].expand(batch, -1, len(spatial_shapes), -1)


class DeformableEncoder(nn.Module):
    """A stack of :class:`DeformableEncoderLayer` with level embeddings added to the positions.

    Args:
        d_model, d_ffn, dropout, n_levels, n_heads, n_points: per-layer settings.
        num_layers: depth of the stack.
    """

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int,
                 n_points: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(d_model, d_ffn, dropout, n_levels, n_heads, n_points)
            for _ in range(num_layers))
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        # The generic Xavier pass above would destroy the deformable attention's own initialisation.
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: list[torch.Tensor], pos_embeds: list[torch.Tensor]) -> list[torch.Tensor]:
        """srcs, pos_embeds: per level N×C×H_l×W_l -> encoded maps with the same shapes."""
        shapes = [(int(x.shape[2]), int(x.shape[3])) for x in srcs]
        tokens = torch.cat([x.flatten(2).transpose(1, 2) for x in srcs], 1)  # N×S×C
        pos = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl]
                         for lvl, p in enumerate(pos_embeds)], 1)
        ref = reference_points(shapes, tokens.shape[0], tokens.device, tokens.dtype)
        for layer in self.layers:
            tokens = layer(tokens, pos, ref, shapes)
        per_level = tokens.split([h * w for h, w in shapes], dim=1)
        return [t.transpose(1, 2).reshape(t.shape[0], -1, h, w) for t, (h, w) in zip(per_level, shapes)]
