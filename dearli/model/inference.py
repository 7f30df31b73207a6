"""Mask-classification inference (panoptic and semantic, as Mask2Former) and test-time resizing.

Inputs are one image's query predictions: ``mask_cls`` Q×(K+1) class logits (void last) or, with
``probs=True``, class probabilities (the geometric ensemble's output), and ``mask_pred`` Q×H×W mask logits.

Test-time geometry: resize the shortest edge (:func:`resize_shortest_edge`), pad right/bottom to a
multiple of 32 (:func:`pad_to_multiple`), run the model, then :func:`postprocess_masks` undoes both.
Mask2Former pads AFTER normalising the image, with 0; ``FrozenClipBackbone`` normalises inside its forward,
so pad the raw [0, 255] image with the backbone's ``pixel_mean`` instead: it normalises to exactly 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _class_probs(mask_cls: torch.Tensor, probs: bool) -> torch.Tensor:
    return mask_cls if probs else F.softmax(mask_cls, dim=-1)


@dataclass(frozen=True)
class PanopticRule:
    """How pixels are handed to segments. The defaults are Mask2Former's rule; the teacher may label with
    another (``ssl.pseudo_things_first``, ``ssl.pseudo_stuff_min_mask``).

    things_first: where a kept thing query's mask is >= 0.5, the pixel goes to the best such thing query before
        stuff competes (a stuff mask that also covers a small thing does not take its pixels);
    stuff_min_mask: a stuff segment keeps only the pixels where its own mask probability reaches this
        (>= 0.5); the others stay unlabeled.
    """

    things_first: bool = False
    stuff_min_mask: float = 0.5


MASK2FORMER_RULE = PanopticRule()


def panoptic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor, thing_ids: Iterable[int],
                       object_mask_threshold: float, overlap_threshold: float,
                       probs: bool = False, rule: PanopticRule = MASK2FORMER_RULE,
                       upsample: Callable[[torch.Tensor], torch.Tensor] | None = None, chunk: int = 0,
                       check: Callable[[], None] | None = None) -> tuple[torch.Tensor, list[dict]]:
    """Q×(K+1) class scores + Q×H×W mask logits -> (panoptic_seg H×W int32, segments).

    Queries predicting void or scoring <= ``object_mask_threshold`` are dropped; each pixel goes to the
    kept query with the highest score·sigmoid(mask); a query keeps its pixels where its own mask is >= 0.5
    only if that visible area is >= ``overlap_threshold`` of its full (>= 0.5) mask. Segment ids count
    from 1 in query order; 0 is unassigned. Stuff queries of an already-placed stuff class paint into that
    class's existing segment (one segment per stuff class) without a new entry; things are never merged.
    ``rule`` changes the pixel hand-out (default: Mask2Former's). ``segments``: list of {"id", "isthing",
    "category_id" (contiguous class id), "score" (the kept query's class score)}.

    Memory: with ``upsample`` (n×h×w logits -> n×H×W logits), ``mask_pred`` is Q×h×w at the model's
    resolution and only ``chunk`` queries (0 = all) are ever upsampled at once, in two passes: the output
    is the same as upsampling every mask first, in O(H·W) memory instead of O(Q·H·W). ``check`` is called
    between chunks (it may raise to stop the work).
    """
    thing_set = {int(t) for t in thing_ids}
    num_classes = mask_cls.shape[-1] - 1
    scores, labels = _class_probs(mask_cls, probs).max(-1)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    cur_scores, cur_classes, cur_logits = scores[keep], labels[keep], mask_pred[keep]
    lazy = _LazyMasks(cur_logits, upsample, chunk, check)
    size = mask_pred.shape[-2:] if upsample is None else upsample(mask_pred[:1]).shape[-2:]
    panoptic_seg = torch.zeros(size, dtype=torch.int32, device=mask_pred.device)
    segments: list[dict] = []
    if cur_logits.shape[0] == 0:
        return panoptic_seg, segments
    is_thing = torch.tensor([int(c) in thing_set for c in cur_classes.tolist()], device=cur_logits.device)
    owner, own_areas = _owners(lazy, cur_scores, is_thing, rule.things_first)
    won_areas = torch.bincount(owner.flatten().long(), minlength=cur_logits.shape[0]).tolist()
    stuff_segment: dict[int, int] = {}
    # Only queries that won pixels and have a mask can make a segment: the second pass upsamples those alone.
    placed = [k for k in range(len(won_areas)) if won_areas[k] > 0 and own_areas[k] > 0]
    for k, mask in lazy.masks(placed):
        category, isthing = int(cur_classes[k]), bool(is_thing[k])
        won_area, own_area = won_areas[k], own_areas[k]
        visible = (owner == k) & (mask >= 0.5)
        # Mask2Former compares the argmax-won area (not the visible one) to the full mask area.
        if not bool(visible.any()) or won_area / own_area < overlap_threshold:
            continue
        if not isthing and rule.stuff_min_mask > 0.5:
            visible = visible & (mask >= rule.stuff_min_mask)
            if not visible.any():
                continue
        before = len(segments)
        paint_segment(panoptic_seg, visible, category, isthing, segments, stuff_segment)
        # The class score of the query that made the segment (the best one for a merged stuff segment).
        seg = segments[-1] if len(segments) > before else segments[stuff_segment[category] - 1]
        seg["score"] = max(seg.get("score", 0.0), float(cur_scores[k]))
    return panoptic_seg, segments


class _LazyMasks:
    """Mask probabilities (sigmoid) of n queries, upsampled ``chunk`` at a time when asked."""

    def __init__(self, logits: torch.Tensor, upsample: Callable[[torch.Tensor], torch.Tensor] | None,
                 chunk: int, check: Callable[[], None] | None):
        self.logits, self.upsample, self.check = logits, upsample, check
        self.chunk = chunk if chunk > 0 else max(1, logits.shape[0])

    def _probs(self, part: torch.Tensor) -> torch.Tensor:
        if self.check is not None:
            self.check()
        return part.sigmoid() if self.upsample is None else self.upsample(part).sigmoid_()

    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(first query index, c×H×W probabilities) for consecutive chunks of all the queries."""
        for start in range(0, self.logits.shape[0], self.chunk):
            yield start, self._probs(self.logits[start:start + self.chunk])

    def masks(self, queries: list[int]) -> Iterator[tuple[int, torch.Tensor]]:
        """(query index, H×W probabilities) of ``queries``, in their order."""
        for start in range(0, len(queries), self.chunk):
            part = queries[start:start + self.chunk]
            probs = self._probs(self.logits[part])
            yield from zip(part, probs)


def _owners(lazy: _LazyMasks, scores: torch.Tensor, is_thing: torch.Tensor,
            things_first: bool) -> tuple[torch.Tensor, list[int]]:
    """Per pixel, the index of the query that wins it, and each query's own (>= 0.5) mask area.

    The winner is the argmax of score·mask (the first query on ties); with ``things_first``, among the thing
    queries alone wherever one of their masks is >= 0.5.
    """
    best = owner = thing_best = thing_owner = thing_zone = None
    own_areas: list[int] = []
    things_first = things_first and bool(is_thing.any())
    for start, masks in lazy.chunks():
        own = masks >= 0.5
        own_areas.extend(own.flatten(1).sum(1).tolist())
        part_things = is_thing[start:start + masks.shape[0]]
        if things_first:
            zone = own[part_things].any(0)
            thing_zone = zone if thing_zone is None else thing_zone | zone
        del own
        weighted = masks.mul_(scores[start:start + masks.shape[0]].view(-1, 1, 1))  # the chunk's own copy
        best, owner = _running_argmax(weighted, start, best, owner)
        if things_first:
            thing_weighted = weighted.masked_fill_(~part_things.view(-1, 1, 1), -1.0)
            thing_best, thing_owner = _running_argmax(thing_weighted, start, thing_best, thing_owner)
    if things_first:
        owner = torch.where(thing_zone, thing_owner, owner)
    return owner, own_areas


def _running_argmax(values: torch.Tensor, start: int, best: torch.Tensor | None,
                    index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold c×H×W ``values`` of queries ``start..`` into the running (max, argmax) over queries; ties keep
    the earlier query, as ``argmax`` over all of them at once does."""
    part_best, part_index = values.max(0)
    part_index = part_index.to(torch.int32).add_(start)  # 4 bytes a pixel instead of 8
    if best is None:
        return part_best, part_index
    better = part_best > best
    return torch.where(better, part_best, best), torch.where(better, part_index, index)


def paint_segment(panoptic_seg, region, category: int, isthing: bool, segments: list[dict],
                  stuff_segment: dict[int, int]) -> None:
    """Paint ``region`` (H×W bool, torch or numpy) of ``panoptic_seg`` as a new segment of ``category``.

    Panoptic format allows one segment per stuff class: a stuff region of a class already placed joins
    that class's segment. Things always get a new id; ids count from 1 in painting order.
    """
    if not isthing and category in stuff_segment:
        panoptic_seg[region] = stuff_segment[category]
        return
    segment_id = len(segments) + 1
    if not isthing:
        stuff_segment[category] = segment_id
    panoptic_seg[region] = segment_id
    segments.append({"id": segment_id, "isthing": isthing, "category_id": category})


def semantic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor, probs: bool = False) -> torch.Tensor:
    """Q×(K+1) class scores + Q×H×W mask logits -> K×H×W per-class scores (void dropped, not renormalised)."""
    class_probs = _class_probs(mask_cls, probs)[..., :-1]
    return torch.einsum("qc,qhw->chw", class_probs, mask_pred.sigmoid())


def shortest_edge_size(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """Output (h, w) scaling the shorter side to ``short``, then capping the longer side at ``max_size``."""
    scale = short / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max(new_h, new_w) > max_size:
        cap = max_size / max(new_h, new_w)
        new_h, new_w = new_h * cap, new_w * cap
    return int(new_h + 0.5), int(new_w + 0.5)


def resize_shortest_edge(image: torch.Tensor, short: int, max_size: int) -> torch.Tensor:
    """Resize a ...×C×H×W float image (bilinear, antialiased when shrinking) by :func:`shortest_edge_size`."""
    size = shortest_edge_size(image.shape[-2], image.shape[-1], short, max_size)
    if size == tuple(image.shape[-2:]):
        return image
    flat = image.reshape(-1, *image.shape[-3:]).float()
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.reshape(*image.shape[:-2], *size).to(image.dtype)


def pad_to_multiple(image: torch.Tensor, divisor: int = 32,
                    value: float | Sequence[float] = 0.0) -> torch.Tensor:
    """Pad ...×C×H×W on the right/bottom to multiples of ``divisor`` with ``value`` (scalar or per channel).

    For raw images going into ``FrozenClipBackbone`` pass ``backbone.pixel_mean``: after its normalisation
    the padding is 0, as Mask2Former's pad-after-normalise.
    """
    height, width = image.shape[-2:]
    pad_h, pad_w = (-height) % divisor, (-width) % divisor
    if pad_h == 0 and pad_w == 0:
        return image
    out = image.new_empty(*image.shape[:-2], height + pad_h, width + pad_w)
    fill = torch.as_tensor(value, dtype=image.dtype, device=image.device)
    out[...] = fill.view(-1, 1, 1) if fill.dim() == 1 else fill
    out[..., :height, :width] = image
    return out


def postprocess_masks(mask_pred: torch.Tensor, padded_hw: tuple[int, int], resized_hw: tuple[int, int],
                      orig_hw: tuple[int, int]) -> torch.Tensor:
    """Mask logits ...×h×w (any stride of the padded input) -> ...×H_orig×W_orig logits.

    Upsample to the padded input size, crop the valid (un-padded) region, resize to the original size;
    all bilinear with align_corners=False, as Mask2Former's sem_seg_postprocess.
    """
    lead = mask_pred.shape[:-2]
    x = mask_pred.reshape(1, -1, *mask_pred.shape[-2:])
    if tuple(x.shape[-2:]) != tuple(padded_hw):
        x = F.interpolate(x, size=tuple(padded_hw), mode="bilinear", align_corners=False)
    x = x[..., : resized_hw[0], : resized_hw[1]]
    x = F.interpolate(x, size=tuple(orig_hw), mode="bilinear", align_corners=False)
    return x.reshape(*lead, *orig_hw)
