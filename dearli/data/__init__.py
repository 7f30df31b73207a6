"""Datasets: COCO panoptic reading, partitions, class names, dataset preparation, the synthetic world."""
