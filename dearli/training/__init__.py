"""Training, plain PyTorch: augmentations, optimisation, checkpoints, one step, the loop skeleton and its hooks,
EMA, pseudo-labels and the Mean-Teacher loss, the supervised loop. The Ray Train stages (dearli.stages) run
the same loop in their workers."""
