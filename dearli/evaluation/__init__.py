"""Evaluation: panoptic quality (panopticapi rules) and semantic-segmentation metrics (detectron2 rules).

- :mod:`dearli.evaluation.pq`: ``pq_compute``, ``collect_stats``, ``pq_from_stats``, ``PQStats``.
- :mod:`dearli.evaluation.semseg`: ``SemSegEvaluator``, ``metrics_from_confusion``,
  ``evaluate_semseg_dirs``, ``evaluate_semseg_panoptic``.
- :mod:`dearli.evaluation.panoptic_io`: reading and checking COCO panoptic JSON/PNG files.
"""
