"""Training: augmentations, optimisation, checkpoints, the supervised loop (Ray stages come later)."""
