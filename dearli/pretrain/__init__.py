"""Stage 1 in miniature: contrastive pre-training of the small CLIP on the synthetic world."""
