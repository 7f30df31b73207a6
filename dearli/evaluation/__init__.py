"""Evaluation: panoptic quality (panopticapi rules) and semantic-segmentation metrics (detectron2 rules)."""
