"""Mask2Former's multi-scale masked transformer decoder.

Learnable queries are refined layer by layer; layer i cross-attends to scale ``i mod 3`` of the
pixel decoder (coarsest first), restricted to the foreground of the mask the queries predicted
before the layer ("masked attention"). A shared head predicts classes and masks from the initial
queries and after every layer, so every layer can be supervised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dearli.config_model import TransformerDecoderConfig
from dearli.model.decoder_layers import MLP, CrossAttentionLayer, FFNLayer, SelfAttentionLayer
from dearli.model.position_encoding import PositionEmbeddingSine

NUM_SCALES = 3  # scales consumed round-robin; matches the pixel decoder's multi_scale_features
MASK_EMBED_LAYERS = 3


def attention_mask_from_logits(mask_logits: torch.Tensor, size: tuple[int, int], num_heads: int) -> torch.Tensor:
    """Masked-attention mask for the next cross-attention.

    Args:
        mask_logits: B×Q×H×W predicted mask logits.
        size: (h, w) of the scale the next layer attends to.
        num_heads: attention heads (the mask is repeated per head, head-minor as
            ``nn.MultiheadAttention`` expects).

    Returns:
        (B·num_heads)×Q×(h·w) bool, True = blocked (predicted background, sigmoid < 0.5). A query
        whose whole row would be blocked attends everywhere instead: a softmax over nothing is NaN,
        and an empty prediction says nothing about where to look. Detached: no gradient flows
        through the mask.
    """
    resized = F.interpolate(mask_logits.detach(), size=size, mode="bilinear", align_corners=False)
    blocked = resized.flatten(2).sigmoid() < 0.5  # B×Q×hw
    blocked = blocked & ~blocked.all(dim=-1, keepdim=True)
    b, q, s = blocked.shape
    return blocked[:, None].expand(b, num_heads, q, s).reshape(b * num_heads, q, s)


class MultiScaleMaskedTransformerDecoder(nn.Module):
    """Masked-attention transformer decoder with deep supervision.

    Args:
        in_channels: channels of the multi-scale features (pixel decoder ``conv_dim``).
        mask_dim: channels of the per-pixel mask features.
        cfg: width, queries, heads, FFN width, depth and norm placement.
        class_head: maps B×Q×hidden_dim query features to B×Q×(K+1) class logits (void last).

    ``forward(multi_scale_features, mask_features)`` returns a dict with
    ``pred_logits`` B×Q×(K+1), ``pred_masks`` B×Q×H×W (H×W of ``mask_features``),
    ``aux_outputs`` (``cfg.num_layers`` dicts with ``pred_logits`` / ``pred_masks`` of the initial
    queries and layers 1..L-1) and ``query_features`` B×Q×hidden_dim (final, normalised).
    """

    def __init__(self, in_channels: int, mask_dim: int, cfg: TransformerDecoderConfig, class_head: nn.Module):
        super().__init__()
        hidden = cfg.hidden_dim
        self.num_heads = cfg.num_heads
        self.num_layers = cfg.num_layers
        self.pe_layer = PositionEmbeddingSine(hidden // 2)
        self.cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden, cfg.num_heads, pre_norm=cfg.pre_norm) for _ in range(cfg.num_layers))
        self.self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden, cfg.num_heads, pre_norm=cfg.pre_norm) for _ in range(cfg.num_layers))
        self.ffn_layers = nn.ModuleList(
            FFNLayer(hidden, cfg.dim_feedforward, pre_norm=cfg.pre_norm) for _ in range(cfg.num_layers))
        self.decoder_norm = nn.LayerNorm(hidden)
        self.query_feat = nn.Embedding(cfg.num_queries, hidden)
        self.query_embed = nn.Embedding(cfg.num_queries, hidden)
        self.level_embed = nn.Embedding(NUM_SCALES, hidden)
        self.input_proj = nn.ModuleList(self._input_proj(in_channels, hidden) for _ in range(NUM_SCALES))
        self.class_head = class_head
        self.mask_embed = MLP(hidden, hidden, mask_dim, MASK_EMBED_LAYERS)

    @staticmethod
    def _input_proj(in_channels: int, hidden: int) -> nn.Module:
        if in_channels == hidden:
            return nn.Identity()
        conv = nn.Conv2d(in_channels, hidden, kernel_size=1)
        nn.init.kaiming_uniform_(conv.weight, a=1)
        nn.init.zeros_(conv.bias)
        return conv

    def forward(self, multi_scale_features: list[torch.Tensor], mask_features: torch.Tensor) -> dict:
        """multi_scale_features: 3 maps B×in_channels×h_i×w_i (coarsest first);
        mask_features: B×mask_dim×H×W. Returns the prediction dict described on the class."""
        if len(multi_scale_features) != NUM_SCALES:
            raise ValueError(f"expected {NUM_SCALES} feature scales, got {len(multi_scale_features)}")
        memories, positions, sizes = [], [], []
        for i, x in enumerate(multi_scale_features):
            sizes.append((int(x.shape[-2]), int(x.shape[-1])))
            positions.append(self.pe_layer(x).flatten(2).transpose(1, 2))  # B×hw×C
            memory = self.input_proj[i](x).flatten(2).transpose(1, 2) + self.level_embed.weight[i]
            memories.append(memory)
        batch = mask_features.shape[0]
        query_pos = self.query_embed.weight[None].expand(batch, -1, -1)
        output = self.query_feat.weight[None].expand(batch, -1, -1)

        predictions = []
        pred, mask_logits = self._predict(output, mask_features)
        predictions.append(pred)
        for i in range(self.num_layers):
            level = i % NUM_SCALES
            attn_mask = attention_mask_from_logits(mask_logits, sizes[level], self.num_heads)
            output = self.cross_attention_layers[i](output, memories[level], attn_mask, positions[level], query_pos)
            output = self.self_attention_layers[i](output, query_pos)
            output = self.ffn_layers[i](output)
            pred, mask_logits = self._predict(output, mask_features)
            predictions.append(pred)

        final = predictions[-1]
        return {
            "pred_logits": final["pred_logits"],
            "pred_masks": final["pred_masks"],
            "aux_outputs": [{"pred_logits": p["pred_logits"], "pred_masks": p["pred_masks"]}
                            for p in predictions[:-1]],
            "query_features": final["query_features"],
        }

    def _predict(self, output: torch.Tensor, mask_features: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """Shared head: B×Q×C queries -> ({pred_logits, pred_masks, query_features}, mask logits)."""
        query_features = self.decoder_norm(output)
        logits = self.class_head(query_features)
        mask_embed = self.mask_embed(query_features)
        masks = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        return {"pred_logits": logits, "pred_masks": masks, "query_features": query_features}, masks


def build_transformer_decoder(in_channels: int, mask_dim: int, cfg: TransformerDecoderConfig,
                              class_head: nn.Module) -> MultiScaleMaskedTransformerDecoder:
    """The masked transformer decoder over ``in_channels``-wide features, with the given class head."""
    return MultiScaleMaskedTransformerDecoder(in_channels, mask_dim, cfg, class_head)
