"""Quick zero-shot recognition check of a CLIP on the synthetic world's validation stream (no files).

Two views of the same question, "does this CLIP know the classes?":
- ``mask``: the oracle setting of DEARLi Fig. 3 and of ``dearli baseline oracle``: dense features of the
  whole image at ``short_side``, pooled inside each ground-truth mask, projected by CLIP's head and
  compared with the 14-template class text embeddings.
- ``crop``: each thing instance cropped (box plus margin), resized to the training resolution and
  encoded as a whole image; separates "knows the shape" from "the stride-32 grid is too coarse".
Thing errors are split into right colour / right shape, because a thing class is colour × shape.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from dearli.data.synth.classes import CLASSES
from dearli.data.synth.world import SynthWorld
from dearli.model.backbone import DENSE_FEATURE, FrozenClipBackbone
from dearli.model.inference import pad_to_multiple, resize_shortest_edge
from dearli.model.text_classifier import class_text_embeddings
from dearli.model.zero_shot import zero_shot_logits

VAL_STREAM = "val"


def _mask_logits(backbone: FrozenClipBackbone, text, image: np.ndarray, masks: np.ndarray,
                 short_side: int, upsample: int = 1) -> torch.Tensor:
    """image H×W×3 uint8, masks N×H×W bool -> N×K zero-shot logits by dense mask pooling.

    ``upsample`` > 1 interpolates the dense feature that many times finer before pooling, so a mask
    smaller than a feature cell still pools the feature at its place instead of vanishing.
    """
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    x = resize_shortest_edge(x, short_side, 4 * short_side)
    resized = x.shape[-2:]
    x = pad_to_multiple(x, 32, backbone.pixel_mean)
    dense = backbone(x)[DENSE_FEATURE]
    if upsample > 1:
        dense = F.interpolate(dense, scale_factor=upsample, mode="bilinear", align_corners=False)
    m = torch.from_numpy(masks).float()[None] * 2 - 1
    m = F.interpolate(m, size=tuple(resized), mode="bilinear", align_corners=False)
    frame = torch.full((1, m.shape[1], *x.shape[-2:]), -1.0)
    frame[..., : resized[0], : resized[1]] = m
    return zero_shot_logits(backbone, dense, frame, text, append_void=False)[0]


def _crop_logits(backbone: FrozenClipBackbone, text, image: np.ndarray, bboxes: list[list[int]],
                 size: int) -> torch.Tensor:
    """One square crop per box (1.5× its larger side) encoded as a whole image -> N×K logits."""
    height, width = image.shape[:2]
    crops = []
    for x, y, w, h in bboxes:
        side = int(min(max(1.5 * max(w, h), 16), height, width))
        top = int(np.clip(y + h / 2 - side / 2, 0, height - side))
        left = int(np.clip(x + w / 2 - side / 2, 0, width - side))
        crop = torch.from_numpy(np.ascontiguousarray(image[top:top + side, left:left + side]))
        crops.append(F.interpolate(crop.permute(2, 0, 1)[None].float(), size=(size, size), mode="bilinear",
                                   align_corners=False, antialias=side > size)[0])
    batch = torch.stack(crops)
    dense = backbone(batch)[DENSE_FEATURE]
    full = torch.ones(len(crops), 1, size, size)
    logits = [zero_shot_logits(backbone, dense[i:i + 1], full[i:i + 1], text, append_void=False)[0, 0]
              for i in range(len(crops))]
    return torch.stack(logits)


def _empty_things(masks: np.ndarray, is_thing: list[bool], short_side: int, size: tuple[int, int]) -> int:
    """Thing masks that vanish on the stride-32 feature grid (their pooled feature is then a constant)."""
    scale = short_side / min(size)
    grid = (max(1, round(size[0] * scale / 32)), max(1, round(size[1] * scale / 32)))
    m = torch.from_numpy(masks[np.asarray(is_thing, dtype=bool)]).float()[None] * 2 - 1
    if m.shape[1] == 0:
        return 0
    small = F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
    return int(((small > 0).flatten(2).sum(-1) == 0).sum())


def _colour(class_id: int) -> str:
    return CLASSES[class_id].name.split()[0]


def zero_shot_report(backbone: FrozenClipBackbone, world_seed: int = 0, num_images: int = 80,
                     short_sides: tuple[int, ...] = (128,), crop_size: int = 128,
                     upsample: int = 1) -> dict[str, float]:
    """Accuracies (fractions) over non-crowd ground-truth segments of ``num_images`` validation scenes.

    Keys: ``mask{S}_things``, ``mask{S}_stuff`` per short side S, ``mask{S}_things_colour`` /
    ``_shape`` (predicted thing class has the right colour / shape), ``crop_things`` (+ colour/shape),
    ``chance`` (1 / number of classes) and ``segments_things`` / ``segments_stuff``.
    """
    world = SynthWorld(world_seed)
    text = class_text_embeddings(backbone, [list(c.names) for c in CLASSES])
    hits: Counter = Counter()
    counts: Counter = Counter()
    with torch.no_grad():
        for index in range(num_images):
            sample = world.sample(index, VAL_STREAM)
            segs = [s for s in sample.segments if not s["iscrowd"]]
            labels = [s["category_id"] for s in segs]
            masks = np.stack([sample.segment_map == s["id"] for s in segs])
            is_thing = [CLASSES[c].isthing for c in labels]
            counts["things"] += sum(is_thing)
            counts["stuff"] += len(labels) - sum(is_thing)
            for side in short_sides:
                hits[f"mask{side}_things_empty"] += _empty_things(masks, is_thing, side, sample.image.shape[:2])
                logits = _mask_logits(backbone, text, sample.image, masks, side)
                _score(hits, f"mask{side}", labels, logits, is_thing)
                if upsample > 1:
                    logits = _mask_logits(backbone, text, sample.image, masks, side, upsample)
                    _score(hits, f"up{side}", labels, logits, is_thing)
            things = [s for s, t in zip(segs, is_thing) if t]
            if things:
                logits = _crop_logits(backbone, text, sample.image, [s["bbox"] for s in things], crop_size)
                _score(hits, "crop", [s["category_id"] for s in things], logits, [True] * len(things))
    report = {key: hits[key] / max(counts[key.split("_")[1]], 1) for key in sorted(hits)}
    report.update(chance=1.0 / len(CLASSES), segments_things=counts["things"], segments_stuff=counts["stuff"])
    return report


_IS_THING = torch.tensor([c.isthing for c in CLASSES])


def _score(hits: Counter, prefix: str, labels: list[int], logits: torch.Tensor, is_thing: list[bool]) -> None:
    """Count hits of N×K ``logits``; thing segments also among thing classes only (given "it is a thing")."""
    pred = logits.argmax(-1).tolist()
    among = logits.masked_fill(~_IS_THING, float("-inf")).argmax(-1).tolist()
    for label, guess, guess_thing_only, thing in zip(labels, pred, among, is_thing):
        if not thing:
            hits[f"{prefix}_stuff"] += int(guess == label)
            continue
        hits[f"{prefix}_things"] += int(guess == label)
        guess_thing = CLASSES[guess].isthing
        hits[f"{prefix}_things_colour"] += int(guess_thing and _colour(guess) == _colour(label))
        hits[f"{prefix}_things_shape"] += int(guess_thing and CLASSES[guess].kind == CLASSES[label].kind)
        hits[f"{prefix}_things_among_things"] += int(guess_thing_only == label)
