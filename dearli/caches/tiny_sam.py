"""A tiny SAM built from segment_anything's own modules, for tests and CPU benchmarks.

Same architecture family as the released models (ViT image encoder, prompt encoder, two-way transformer
mask decoder) at toy width and depth and a 64-px input, so the real automatic-mask-generation path runs
on a CPU in well under a second per image. Without a checkpoint the weights are a seeded random
initialisation, identical in every process that builds it (so distributed workers agree).
"""

from __future__ import annotations

from functools import partial

import torch

TINY_IMG_SIZE = 64  # input side after SAM's resize-longest-side + pad
TINY_PATCH = 8  # ViT patch size -> an 8×8 image embedding
TINY_DIM = 32  # width of encoder, prompt embeddings and decoder


def build_tiny_sam(checkpoint: str | None = None, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised (seeded) or checkpoint-loaded tiny ``segment_anything.modeling.Sam``."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    embed_side = TINY_IMG_SIZE // TINY_PATCH
    # fork_rng keeps the caller's global random state untouched by our seeded initialisation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=TINY_IMG_SIZE, patch_size=TINY_PATCH, embed_dim=TINY_DIM, depth=1, num_heads=2,
                mlp_ratio=2.0, out_chans=TINY_DIM, qkv_bias=True,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=False, window_size=0,
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=TINY_DIM, image_embedding_size=(embed_side, embed_side),
                input_image_size=(TINY_IMG_SIZE, TINY_IMG_SIZE), mask_in_chans=4,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=1, embedding_dim=TINY_DIM, mlp_dim=64, num_heads=2),
                transformer_dim=TINY_DIM, iou_head_depth=2, iou_head_hidden_dim=32,
            ),
        )
    if checkpoint:
        sam.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return sam.eval()
