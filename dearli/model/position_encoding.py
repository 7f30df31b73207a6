"""Sine positional encoding of 2-D feature maps (DETR / Mask2Former convention)."""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Fixed sin/cos encoding of normalised pixel coordinates.

    Row and column indices (1-based) are divided by the map's height / width and scaled to
    ``[0, 2π]`` so that maps of different resolution share one coordinate frame. The first half of
    the channels encodes y, the second half x; within each half, channels alternate sin/cos over
    geometrically spaced frequencies.

    Args:
        num_pos_feats: channels per axis; the output has ``2·num_pos_feats`` channels.
        temperature: base of the frequency progression.
        scale: range the normalised coordinates are stretched to.
    """

    def __init__(self, num_pos_feats: int = 64, temperature: float = 10000.0, scale: float = 2 * math.pi):
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even (sin/cos pairs), got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B×C×H×W (only its shape, device and dtype are used) -> B×(2·num_pos_feats)×H×W.

        The batch dimension is a broadcast view (no copy): the encoding does not depend on content.
        """
        b, _, h, w = x.shape
        dtype = x.dtype if x.dtype == torch.float64 else torch.float32
        eps = 1e-6  # same normalisation constant as DETR, so pretrained decoders see familiar codes
        y = torch.arange(1, h + 1, dtype=dtype, device=x.device) / (h + eps) * self.scale
        xs = torch.arange(1, w + 1, dtype=dtype, device=x.device) / (w + eps) * self.scale
        idx = torch.arange(self.num_pos_feats, dtype=dtype, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(idx, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_y = self._interleave(y[:, None] / dim_t)  # H×F
        pos_x = self._interleave(xs[:, None] / dim_t)  # W×F
        pos = torch.cat((pos_y[:, None, :].expand(h, w, -1), pos_x[None, :, :].expand(h, w, -1)), dim=-1)
        return pos.permute(2, 0, 1).unsqueeze(0).to(x.dtype).expand(b, -1, -1, -1)

    @staticmethod
    def _interleave(angles: torch.Tensor) -> torch.Tensor:
        """N×F angles -> N×F as [sin a0, cos a1, sin a2, cos a3, ...]."""
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=-1).flatten(1)

    def extra_repr(self) -> str:
        return f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, scale={self.scale:.4f}"
