"""Building blocks of the masked transformer decoder: cross-attention, self-attention, FFN, MLP.

All tensors are batch-first (B×Q×C queries, B×S×C memory). Each block is residual with a
LayerNorm either after the residual sum (post-norm, Mask2Former's default) or before the block
(pre-norm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _xavier_matrices(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class CrossAttentionLayer(nn.Module):
    """Queries attend to image features; an optional boolean mask hides blocked positions.

    Args:
        d_model: width of queries and memory.
        nhead: attention heads.
        dropout: dropout on the attention output.
        pre_norm: LayerNorm before attention instead of after the residual sum.
    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, pre_norm: bool = False):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm
        _xavier_matrices(self)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, attn_mask: torch.Tensor | None,
                pos: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        """tgt, query_pos: B×Q×C; memory, pos: B×S×C (pos may broadcast over B);
        attn_mask: (B·heads)×Q×S bool, True = blocked, or None. Returns B×Q×C."""
        query = self.norm(tgt) if self.pre_norm else tgt
        out = self.multihead_attn(query + query_pos, memory + pos, memory, attn_mask=attn_mask,
                                  need_weights=False)[0]
        tgt = tgt + self.dropout(out)
        return tgt if self.pre_norm else self.norm(tgt)


class SelfAttentionLayer(nn.Module):
    """Queries exchange information with each other (no mask).

    Args: as :class:`CrossAttentionLayer`.
    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, pre_norm: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm
        _xavier_matrices(self)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        """tgt, query_pos: B×Q×C -> B×Q×C."""
        x = self.norm(tgt) if self.pre_norm else tgt
        q = x + query_pos
        out = self.self_attn(q, q, x, need_weights=False)[0]
        tgt = tgt + self.dropout(out)
        return tgt if self.pre_norm else self.norm(tgt)


class FFNLayer(nn.Module):
    """Two-layer ReLU feed-forward block.

    Args:
        d_model: token width.
        dim_feedforward: hidden width.
        dropout: dropout inside and after the block.
        pre_norm: LayerNorm before the block instead of after the residual sum.
    """

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float = 0.0, pre_norm: bool = False):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm
        _xavier_matrices(self)

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        """tgt: B×Q×C -> B×Q×C."""
        x = self.norm(tgt) if self.pre_norm else tgt
        tgt = tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        return tgt if self.pre_norm else self.norm(tgt)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (none after the last).

    Args:
        input_dim, hidden_dim, output_dim: widths.
        num_layers: number of linear layers (>= 1).
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP needs at least one layer, got {num_layers}")
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: …×input_dim -> …×output_dim."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x
