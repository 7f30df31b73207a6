"""Training samples of DeWa, the class-agnostic warm-up: an image and its SAM automatic masks.

SAM masks overlap (a part and its whole are both masks); each stays a separate target, as in DEARLi's
warm-up, so the decoder learns to propose every region SAM finds. Every target has label 0: the class
loss is multiplied by 0 in this stage, so the label only has to be a valid index.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dearli.config import DataConfig, WarmupConfig
from dearli.training.augment import augment


def sam_sample(image: np.ndarray, masks: np.ndarray, stem: str, data: DataConfig, warmup: WarmupConfig,
               generator: torch.Generator) -> dict[str, Any]:
    """Augment an image with its SAM masks into a training sample (the format of ``training.data.collate``).

    Args:
        image: H×W×3 uint8 RGB.
        masks: N×H×W bool SAM masks (any order, overlapping).
    Returns:
        {"image": 3×S×S uint8, "masks": M×S×S bool, "labels": M int64 zeros, "valid": S×S bool, "stem"},
        M ≤ ``warmup.max_masks``: the largest masks of at least ``warmup.min_mask_area`` pixels after cropping.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    mask_tensor = torch.from_numpy(np.ascontiguousarray(masks, dtype=bool))
    labels = torch.zeros(mask_tensor.shape[0], dtype=torch.int64)
    sample = augment(tensor, mask_tensor, labels, data, generator)
    kept = sample.masks
    if kept.shape[0]:
        area = kept.flatten(1).sum(1)
        order = torch.argsort(area, descending=True, stable=True)
        order = order[area[order] >= warmup.min_mask_area][: warmup.max_masks]
        kept = kept[order]
    return {"image": sample.image, "masks": kept, "labels": torch.zeros(kept.shape[0], dtype=torch.int64),
            "valid": sample.valid, "stem": stem}


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The augmentation randomness of one sample: a function of (seed, epoch, index) only, so a repeated step
    after a restart sees the same crops."""
    return torch.Generator().manual_seed(hash((seed, epoch, index)) & 0x7FFFFFFF)
