"""Mask2Former's pixel decoder: a deformable-attention encoder over the three coarsest backbone
levels, then an FPN step down to the finest level, which gives the per-pixel mask features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dearli.config_model import PixelDecoderConfig
from dearli.model.deformable_encoder import DeformableEncoder
from dearli.model.position_encoding import PositionEmbeddingSine

NUM_ENCODER_LEVELS = 3  # Mask2Former feeds exactly three scales to its transformer decoder
MAX_NORM_GROUPS = 32


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or the largest divisor of ``channels`` below that for narrow layers."""
    groups = max(g for g in range(1, min(MAX_NORM_GROUPS, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def _c2_xavier_fill(conv: nn.Conv2d) -> None:
    # Caffe2's "XavierFill" (uniform, fan-in) used throughout detectron2 heads.
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _conv_gn(in_channels: int, out_channels: int, kernel_size: int, relu: bool) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
    _c2_xavier_fill(conv)
    layers: list[nn.Module] = [conv, group_norm(out_channels)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class MSDeformAttnPixelDecoder(nn.Module):
    """Multi-scale deformable-attention pixel decoder.

    Args:
        input_shape: backbone feature name -> (channels, stride), e.g. ``{"res2": (40, 4), ...,
            "res5": (320, 32)}``; at least four levels. The three coarsest go through the encoder,
            the finer ones through FPN steps.
        cfg: widths and depth of the decoder.

    ``forward(features)`` takes the named maps (B×C_k×H/s_k×W/s_k) and returns
    ``(mask_features, multi_scale_features)``: B×mask_dim×H/s_min×W/s_min and a list of three
    B×conv_dim×h×w encoder outputs, coarsest (res5) first.
    """

    def __init__(self, input_shape: dict[str, tuple[int, int]], cfg: PixelDecoderConfig):
        super().__init__()
        if len(input_shape) < NUM_ENCODER_LEVELS + 1:
            raise ValueError(f"need at least {NUM_ENCODER_LEVELS + 1} feature levels, got {sorted(input_shape)}")
        ordered = sorted(input_shape.items(), key=lambda item: item[1][1])  # fine -> coarse
        self.in_features = [name for name, _ in ordered]
        # Coarse -> fine, the order in which both the encoder and the FPN consume them.
        self.encoder_features = [name for name, _ in ordered[-NUM_ENCODER_LEVELS:]][::-1]
        self.fpn_features = [name for name, _ in ordered[:-NUM_ENCODER_LEVELS]][::-1]
        channels = dict((name, c) for name, (c, _) in ordered)
        conv_dim = cfg.conv_dim

        self.input_proj = nn.ModuleList()
        for name in self.encoder_features:
            conv = nn.Conv2d(channels[name], conv_dim, kernel_size=1)
            nn.init.xavier_uniform_(conv.weight, gain=1)
            nn.init.zeros_(conv.bias)
            self.input_proj.append(nn.Sequential(conv, group_norm(conv_dim)))
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2)
        self.encoder = DeformableEncoder(conv_dim, cfg.dim_feedforward, cfg.dropout, NUM_ENCODER_LEVELS,
                                         cfg.num_heads, cfg.num_points, cfg.num_layers)
        self.lateral_convs = nn.ModuleList(_conv_gn(channels[n], conv_dim, 1, relu=False)
                                           for n in self.fpn_features)
        self.output_convs = nn.ModuleList(_conv_gn(conv_dim, conv_dim, 3, relu=True) for _ in self.fpn_features)
        self.mask_features = nn.Conv2d(conv_dim, cfg.mask_dim, kernel_size=1)
        _c2_xavier_fill(self.mask_features)
        self.conv_dim = conv_dim
        self.mask_dim = cfg.mask_dim

    def forward(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """features: name -> B×C×h×w -> (B×mask_dim×H_fine×W_fine, [res5, res4, res3] B×conv_dim×h×w)."""
        missing = [name for name in self.in_features if name not in features]
        if missing:
            raise KeyError(f"pixel decoder expects features {self.in_features}; missing {missing}")
        device_type = features[self.in_features[0]].device.type
        # Deformable sampling is imprecise in half precision, so the whole decoder runs in fp32.
        with torch.autocast(device_type=device_type, enabled=False):
            return self._forward(features)

    def _forward(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        srcs, pos = [], []
        for proj, name in zip(self.input_proj, self.encoder_features):
            x = _full_precision(features[name])
            srcs.append(proj(x))
            pos.append(self.pe_layer(x))
        outs = self.encoder(srcs, pos)
        multi_scale = list(outs)
        current = outs[-1]
        for lateral, output, name in zip(self.lateral_convs, self.output_convs, self.fpn_features):
            skip = lateral(_full_precision(features[name]))
            # Bilinear rather than nearest upsampling, as in Mask2Former.
            current = output(skip + F.interpolate(current, size=skip.shape[-2:], mode="bilinear",
                                                  align_corners=False))
        return self.mask_features(current), multi_scale


def _full_precision(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def build_pixel_decoder(input_shape: dict[str, tuple[int, int]], cfg: PixelDecoderConfig) -> MSDeformAttnPixelDecoder:
    """The pixel decoder for backbone features described by ``input_shape`` (name -> (channels, stride))."""
    return MSDeformAttnPixelDecoder(input_shape, cfg)
