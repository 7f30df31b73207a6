"""Zero-shot baselines built on the caches: SAM+CLIP and the ground-truth-mask oracle."""
