"""The model's configuration (``Config.model``): backbone, decoders, classifier, ensemble, loss, inference.

Frozen dataclasses like the rest of :mod:`dearli.config`, which builds, overrides and validates the whole tree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dearli.config_io import require

# model.backbone.pretrained value naming the project's own small CLIP, pre-trained on the synthetic world
# (dearli pretrain-clip); drivers replace it by the cached checkpoint's path (dearli.pretrain.resolve).
PROJECT_CLIP = "dearli-synth"


@dataclass(frozen=True)
class BackboneConfig:
    # The official DEARLi weights: ConvNeXt-B at 320 px, LAION-Aesthetic (the same architecture as convnext_base_w).
    clip_model: str = "convnext_base_w_320"  # open_clip model name whose vision tower is a timm ConvNeXt
    # open_clip pretrained tag, local checkpoint, PROJECT_CLIP, or "" (random weights)
    pretrained: str = "laion_aesthetic_s13b_b82k_augreg"

    def validate(self) -> None:
        require(bool(self.clip_model), "model.backbone.clip_model", "must name an open_clip model")


@dataclass(frozen=True)
class PixelDecoderConfig:
    conv_dim: int = 256  # channels of the deformable encoder and FPN
    mask_dim: int = 256  # channels of the per-pixel mask features
    num_layers: int = 6  # deformable-attention encoder layers over res3-res5
    num_heads: int = 8  # attention heads in the deformable encoder
    num_points: int = 4  # sampling points per head and level
    dim_feedforward: int = 1024  # FFN width of the encoder layers
    dropout: float = 0.0  # dropout inside the encoder layers

    def validate(self) -> None:
        require(self.conv_dim % self.num_heads == 0, "model.pixel_decoder.conv_dim",
                 f"must be divisible by num_heads={self.num_heads}")


@dataclass(frozen=True)
class TransformerDecoderConfig:
    hidden_dim: int = 256  # query width
    num_queries: int = 200  # object queries (DEARLi uses 200)
    num_heads: int = 8  # attention heads
    dim_feedforward: int = 2048  # FFN width
    num_layers: int = 9  # decoder layers, round-robin over the three scales
    pre_norm: bool = False  # LayerNorm before (True) or after (False) each block

    def validate(self) -> None:
        require(self.hidden_dim % self.num_heads == 0, "model.transformer_decoder.hidden_dim",
                 f"must be divisible by num_heads={self.num_heads}")
        require(self.num_queries > 0, "model.transformer_decoder.num_queries", "must be positive")


@dataclass(frozen=True)
class ClassifierConfig:
    logit_scale_init: float = math.log(1 / 0.07)  # learnable log temperature of the M2F-Lang classifier
    logit_scale_max: float = 100.0  # clamp on exp(logit_scale)


@dataclass(frozen=True)
class EnsembleConfig:
    alpha_clip: float = 0.4  # weight of the zero-shot CLIP branch in the geometric ensemble
    schedule: str = "constant"  # constant | linear | budget (see dearli.model.ensemble.alpha_schedule)
    alpha_clip_end: float = 0.4  # final weight for the linear schedule
    # FC-CLIP's and DEARLi's ENSEMBLE_ON_VALID_MASK (off there and here by default): a mask left empty on
    # the CLIP feature grid keeps the decoder's classes alone instead of CLIP's logits of an empty pool.
    on_valid_mask: bool = False

    def validate(self) -> None:
        for name in ("alpha_clip", "alpha_clip_end"):
            value = getattr(self, name)
            require(0.0 <= value <= 1.0, f"model.ensemble.{name}", f"must lie in [0, 1], got {value}")
        require(self.schedule in ("constant", "linear", "budget"), "model.ensemble.schedule",
                 f"must be constant, linear or budget, got {self.schedule!r}")


@dataclass(frozen=True)
class LossConfig:
    class_weight: float = 2.0  # weight of the classification CE; 0 makes training class-agnostic
    mask_weight: float = 5.0  # weight of the point-sampled mask BCE
    dice_weight: float = 5.0  # weight of the point-sampled dice loss
    no_object_weight: float = 0.1  # CE weight of the void ("no object") class
    num_points: int = 12544  # points sampled per mask for matching and losses (112²)
    oversample_ratio: float = 3.0  # uncertainty sampling: candidates per kept point
    importance_sample_ratio: float = 0.75  # share of points chosen by uncertainty
    deep_supervision: bool = True  # the same losses on every auxiliary prediction

    def validate(self) -> None:
        for name in ("class_weight", "mask_weight", "dice_weight", "no_object_weight"):
            require(getattr(self, name) >= 0, f"model.loss.{name}", "must be >= 0")
        require(0.0 <= self.importance_sample_ratio <= 1.0, "model.loss.importance_sample_ratio",
                 "must lie in [0, 1]")
        require(self.oversample_ratio >= 1.0, "model.loss.oversample_ratio", "must be >= 1")


@dataclass(frozen=True)
class InferenceConfig:
    # DEARLi's configs and its teacher keep every query whose best class is not void (0.0). Mask2Former's
    # supervised 0.8 drops correct segments, whose ensembled (geometric mean) probability is rarely that high.
    object_mask_threshold: float = 0.0  # minimum class score of a kept query
    overlap_threshold: float = 0.8  # minimum visible share of a kept mask
    test_short_side: int = 512  # test-time resize of the shortest edge
    test_max_size: int = 2048  # cap on the longest edge after resizing
    size_divisibility: int = 32  # pad the input to a multiple of this


@dataclass(frozen=True)
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    transformer_decoder: TransformerDecoderConfig = field(default_factory=TransformerDecoderConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
