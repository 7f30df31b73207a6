"""Zero-shot CLIP branch: pool dense CLIP features inside each predicted mask and classify the pooled
vector with CLIP's own head and text embeddings (FC-CLIP's out-of-vocabulary classifier).

Mask resizing follows FC-CLIP: the mask LOGITS are resized bilinearly (align_corners=False) to the dense
feature size and then binarised with ``> 0``. Resizing logits before thresholding keeps the mask boundary
where the logit crosses zero; thresholding first and then resizing would round it to the coarse grid.
No antialiasing is applied (as upstream), so a mask much smaller than one stride-32 cell can come out
empty. Its pooled vector is then zero, but its CLIP logits are not: CLIP's head normalises the pooled
vector with a LayerNorm, which maps zero to the LayerNorm's bias, so every empty mask gets the same
class-dependent logits (those of that fixed vector), as upstream.

Pooling and classification run in fp32 with autocast off, as the decoder's class head does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dearli.model.text_classifier import TextEmbeddings, reduce_synonyms, synonym_table

POOL_EPS = 1e-8  # keeps the average defined for empty masks


@torch.no_grad()
def pooling_masks(mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Mask logits B×Q×H×W -> the binary masks B×Q×h×w (0/1, float) pooled on an h×w feature grid."""
    masks = mask_logits.detach().float()
    if masks.shape[-2:] != tuple(size):
        masks = F.interpolate(masks, size=tuple(size), mode="bilinear", align_corners=False)
    return (masks > 0).float()


def valid_pooling(mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """B×Q bool: the masks that keep at least one cell on the h×w feature grid (FC-CLIP's valid masking)."""
    return pooling_masks(mask_logits, size).flatten(2).any(-1)


def mask_pool(dense: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Average ``dense`` B×C×h×w inside each binarised mask of ``mask_logits`` B×Q×H×W -> B×Q×C.

    Masks are detached (no gradient flows into the mask predictions through pooling).
    """
    if dense.dim() != 4 or mask_logits.dim() != 4 or dense.shape[0] != mask_logits.shape[0]:
        raise ValueError(f"expected dense B×C×h×w and masks B×Q×H×W, got {tuple(dense.shape)} and "
                         f"{tuple(mask_logits.shape)}")
    masks = pooling_masks(mask_logits, dense.shape[-2:]).to(dense.dtype)
    masks = masks / (masks.sum(dim=(-2, -1), keepdim=True) + POOL_EPS)
    return torch.einsum("bchw,bqhw->bqc", dense, masks)


def zero_shot_logits(backbone: torch.nn.Module, dense: torch.Tensor, mask_logits: torch.Tensor,
                     text: TextEmbeddings, append_void: bool = True) -> torch.Tensor:
    """CLIP's classification of each predicted mask: B×Q×K, or B×Q×(K+1) with a dummy void column.

    dense: ``clip_vis_dense`` B×C5×h×w from the backbone; mask_logits: B×Q×H×W decoder mask logits;
    text: class text embeddings (S×D normalised + synonym index). Logits are CLIP's exp'd logit scale
    times the cosine between the CLIP-projected pooled feature and the text, max over synonyms. The void
    column (CLIP has no notion of void) holds the most negative finite value, so a softmax gives it
    zero probability; :func:`dearli.model.ensemble.geometric_ensemble` drops it anyway.
    """
    with torch.no_grad(), torch.autocast(device_type=dense.device.type, enabled=False):
        pooled = mask_pool(dense.float(), mask_logits.float())
        image = F.normalize(backbone.visual_prediction(pooled).float(), dim=-1)
        cos = image @ text.embeddings.to(image).t()
        num_classes = int(text.synonym_to_class.max()) + 1
        logits = backbone.logit_scale.to(image) * reduce_synonyms(
            cos, synonym_table(text.synonym_to_class.to(image.device), num_classes))
        if append_void:
            void = torch.full_like(logits[..., :1], torch.finfo(logits.dtype).min)
            logits = torch.cat([logits, void], dim=-1)
    return logits
