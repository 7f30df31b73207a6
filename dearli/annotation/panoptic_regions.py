"""Labelled regions of one image -> a COCO panoptic segment map and its ``segments_info``.

Regions are painted in their order and a later region wins where they overlap (in an annotation tool, what
was drawn last lies on top). Every region of a thing class is its own instance; the regions of one stuff
class are one segment (COCO panoptic has one segment per stuff class and image). A region marked crowd is a
thing segment with ``iscrowd`` 1; stuff has no crowds (the flag is listed as a problem and dropped). Class
labels map onto the dataset's categories by display name, then case-insensitively, then by an unambiguous
synonym.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dearli.annotation.label_studio_results import Problem, Region
from dearli.data.panoptic import Category
from dearli.data.writing import segment_entry


def paint_regions(regions: list[Region], size: tuple[int, int], lookup: Callable[[str], Category | None],
                  task: object = None, stem: str | None = None) -> tuple[np.ndarray, list[dict], list[Problem]]:
    """Paint ``regions`` (masks of ``size`` = (H, W)) into a panoptic segment map.

    Returns the H×W int64 segment map (ids 1..N, 0 = unlabeled), the N ``segments_info`` entries (dataset
    category ids, area, bbox, iscrowd) and the problems: unknown classes, empty masks, regions a later one
    covered entirely, crowd flags on stuff."""
    segment_map = np.zeros(size, np.int64)
    categories: list[Category] = []  # of segment id k + 1
    crowds: list[bool] = []  # of segment id k + 1
    stuff_segment: dict[int, int] = {}
    painted: list[tuple[Region, int]] = []
    problems = []
    for region in regions:
        category = lookup(region.label)
        problem = None if category else ("unknown-class", "no class of the dataset has this name")
        if problem is None and not region.mask.any():
            problem = ("empty-mask", "the region has no pixel")
        if problem:
            problems.append(Problem(*problem, task, stem, region.region_id, region.label))
            continue
        if region.crowd and not category.isthing:
            problems.append(Problem("crowd-stuff", "stuff has no instances: imported without the crowd flag",
                                    task, stem, region.region_id, region.label))
        segment_id = stuff_segment.get(category.id) if not category.isthing else None
        if segment_id is None:
            categories.append(category)
            crowds.append(region.crowd and category.isthing)
            segment_id = len(categories)
            if not category.isthing:
                stuff_segment[category.id] = segment_id
        segment_map[region.mask] = segment_id
        painted.append((region, segment_id))
    for region, segment_id in painted:
        if not (segment_map[region.mask] == segment_id).any():
            problems.append(Problem("hidden", "later regions cover all of its pixels", task, stem,
                                    region.region_id, region.label))
    return (*_renumber(segment_map, categories, crowds), problems)


def _renumber(segment_map: np.ndarray, categories: list[Category],
              crowds: list[bool]) -> tuple[np.ndarray, list[dict]]:
    """Drop segments without a pixel left and number the rest 1..N in their order."""
    present = np.zeros(len(categories) + 1, bool)
    present[np.unique(segment_map)] = True
    new_id = np.zeros(len(categories) + 1, np.int64)
    new_id[1:][present[1:]] = np.arange(1, int(present[1:].sum()) + 1)
    segment_map = new_id[segment_map]
    kept = [(c, crowd) for c, crowd, keep in zip(categories, crowds, present[1:]) if keep]
    infos = [segment_entry(k, c.id, segment_map == k, crowd) for k, (c, crowd) in enumerate(kept, start=1)]
    return segment_map, infos
