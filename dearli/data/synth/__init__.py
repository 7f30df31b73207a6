"""The synthetic panoptic world: CPU-sized, deterministic, the default dataset of every stage."""
