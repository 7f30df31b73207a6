"""dearli: semi-supervised panoptic segmentation with DEARLi."""

__version__ = "0.1.0"
