"""M2F-Lang: Mask2Former on a frozen OpenCLIP ConvNeXt, classifying queries against CLIP text embeddings.

``build_m2f_lang(cfg, class_names)`` assembles the parts (``cfg``: the ``model`` section of a preset,
``load_config(preset).model``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dearli.config_model import ModelConfig
from dearli.model.backbone import FrozenClipBackbone, build_backbone
from dearli.model.pixel_decoder import MSDeformAttnPixelDecoder, build_pixel_decoder
from dearli.model.text_classifier import TextClassifier, TextEmbeddings, class_text_embeddings, text_cache_dir
from dearli.model.transformer_decoder import MultiScaleMaskedTransformerDecoder, build_transformer_decoder
from dearli.model.zero_shot import zero_shot_logits

# The pixel decoder sees the four ConvNeXt stages; the dense CLIP feature is for the zero-shot branch only.
DECODER_INPUTS = ("res2", "res3", "res4", "res5")


class M2FLang(nn.Module):
    """Frozen CLIP backbone -> deformable pixel decoder -> masked-attention decoder with a text classifier.

    ``forward(images B×3×H×W RGB in [0, 255], H and W multiples of 32)`` returns the decoder's dict
    (``pred_logits`` B×Q×(K+1), ``pred_masks`` B×Q×H/4×W/4, ``aux_outputs``, ``query_features``) plus
    ``clip_vis_dense`` B×C×H/32×W/32 for the zero-shot branch.
    """

    def __init__(self, backbone: FrozenClipBackbone, pixel_decoder: MSDeformAttnPixelDecoder,
                 transformer_decoder: MultiScaleMaskedTransformerDecoder):
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder
        self.text: TextEmbeddings | None = None
        self.class_names: list[list[str]] | None = None

    @property
    def classifier(self) -> TextClassifier:
        return self.transformer_decoder.class_head

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    def set_classes(self, class_names: Sequence[Sequence[str]]) -> None:
        """Install the vocabulary: one list of synonyms per class (K classes)."""
        names = [[s] if isinstance(s, str) else list(s) for s in class_names]
        self.set_text(names, class_text_embeddings(self.backbone, names, text_cache_dir()))

    def set_text(self, class_names: list[list[str]], text: TextEmbeddings) -> None:
        """Install a vocabulary whose text embeddings are already computed (:func:`class_text_embeddings` of
        this backbone and ``class_names``): cheap, so a labeling endpoint encodes a new list outside its lock."""
        device = self.classifier.void_embedding.device
        self.class_names = class_names
        self.text = TextEmbeddings(text.embeddings.to(device), text.synonym_to_class.to(device))
        self.classifier.set_text_embeddings(self.text.embeddings, self.text.synonym_to_class)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        # The text embeddings are derived from the (possibly just replaced) text tower, not stored.
        if self.class_names is not None:
            self.set_classes(self.class_names)
        return result

    def forward(self, images: torch.Tensor) -> dict:
        features = self.backbone(images)
        mask_features, multi_scale = self.pixel_decoder({k: features[k] for k in DECODER_INPUTS})
        outputs = self.transformer_decoder(multi_scale, mask_features)
        outputs["clip_vis_dense"] = features["clip_vis_dense"]
        return outputs

    def zero_shot_logits(self, outputs: dict) -> torch.Tensor:
        """CLIP's own classification of the final masks: B×Q×(K+1), void column at -inf-like."""
        if self.text is None:
            raise RuntimeError("no vocabulary: call set_classes first")
        return zero_shot_logits(self.backbone, outputs["clip_vis_dense"], outputs["pred_masks"], self.text)

    def to(self, *args, **kwargs):  # keep the cached text embeddings on the model's device
        module = super().to(*args, **kwargs)
        if self.text is not None:
            device = self.classifier.void_embedding.device
            self.text = TextEmbeddings(self.text.embeddings.to(device), self.text.synonym_to_class.to(device))
        return module


def build_m2f_lang(cfg: ModelConfig, class_names: Sequence[Sequence[str]] | None = None) -> M2FLang:
    """Assemble M2F-Lang from ``cfg``; with ``class_names`` (synonym lists) the vocabulary is installed too."""
    backbone = build_backbone(cfg.backbone)
    input_shape = {k: backbone.output_shape[k] for k in DECODER_INPUTS}
    pixel_decoder = build_pixel_decoder(input_shape, cfg.pixel_decoder)
    classifier = TextClassifier(cfg.transformer_decoder.hidden_dim, backbone.embed_dim, cfg.classifier)
    decoder = build_transformer_decoder(cfg.pixel_decoder.conv_dim, cfg.pixel_decoder.mask_dim,
                                        cfg.transformer_decoder, classifier)
    model = M2FLang(backbone, pixel_decoder, decoder)
    if class_names is not None:
        model.set_classes(class_names)
    return model
