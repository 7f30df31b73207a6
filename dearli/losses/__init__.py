"""Mask2Former set prediction losses: Hungarian matching with point sampling, SetCriterion."""

from dearli.losses.criterion import SetCriterion, build_criterion, thing_label_sets, total_loss
from dearli.losses.matcher import HungarianMatcher
from dearli.losses.point_sampling import calculate_uncertainty, point_sample, uncertain_point_coords

__all__ = [
    "HungarianMatcher",
    "SetCriterion",
    "build_criterion",
    "calculate_uncertainty",
    "point_sample",
    "thing_label_sets",
    "total_loss",
    "uncertain_point_coords",
]
