"""Zero-shot classification of arbitrary masks from a CLIP feature cache (FC-CLIP's CLIP branch).

A mask in original image pixels is brought into the cached feature's frame (resize like the image, pad
as "outside"), the raw dense feature is averaged inside it (``mask_pool``), CLIP's head projects the
pooled vector (``visual_prediction``) and its cosine to the class text embeddings, times CLIP's logit
scale, gives the logits. The backbone is rebuilt from the cache's manifest only for that head.
"""

from __future__ import annotations

import numpy as np
import torch

from dearli.caches.clip_features import build_cache_backbone, masks_to_feature_frame, text_embeddings_from_table
from dearli.caches.readers import decode_feature, read_clip_cache, read_text_embeddings
from dearli.data.panoptic import CategoryMap
from dearli.errors import DataError
from dearli.model.zero_shot import zero_shot_logits

MASK_CHUNK = 64  # masks pooled per call: bounds the N×H_pad×W_pad float buffer


class CachedClipClassifier:
    """Classify masks of cached images into the K classes of ``categories``."""

    def __init__(self, clip_uri: str, categories: CategoryMap):
        self.reader = read_clip_cache(clip_uri)
        self.uri = clip_uri
        settings = self.reader.settings
        table = read_text_embeddings(clip_uri)
        by_class = {}
        for k, cat_id in zip(table.column("class_index").to_pylist(), table.column("category_id").to_pylist()):
            by_class[k] = cat_id
        wanted = {k: c.id for k, c in enumerate(categories.categories)}
        if by_class != wanted:
            raise DataError(clip_uri, "text embeddings were computed for another class list than this dataset's "
                                      "(rebuild the CLIP cache for this dataset)")
        self.text = text_embeddings_from_table(table)
        self.backbone = build_cache_backbone(settings["clip_model"], settings["pretrained"])
        self.num_classes = categories.num_classes

    def row(self, stem: str, height: int, width: int) -> dict:
        if stem not in self.reader:
            raise DataError(self.uri, f"image '{stem}' is not in the CLIP cache; run 'dearli cache clip' for it")
        row = self.reader[stem]
        if (row["height"], row["width"]) != (height, width):
            raise DataError(self.uri, f"image '{stem}' was cached at {row['height']}×{row['width']}, "
                                      f"the dataset says {height}×{width}")
        return row

    def logits(self, stem: str, masks: np.ndarray) -> torch.Tensor:
        """masks N×H×W bool (original pixels) of image ``stem`` -> N×K zero-shot CLIP logits."""
        row = self.row(stem, masks.shape[1], masks.shape[2])
        dense = torch.from_numpy(decode_feature(row).astype(np.float32))[None]
        out = [torch.zeros(0, self.num_classes)]
        for start in range(0, len(masks), MASK_CHUNK):
            frame = masks_to_feature_frame(masks[start:start + MASK_CHUNK], row)[None]
            out.append(zero_shot_logits(self.backbone, dense, frame, self.text, append_void=False)[0].float())
        return torch.cat(out)
