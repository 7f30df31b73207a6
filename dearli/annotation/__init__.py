"""Exchange of labels with annotation tools: pseudo-labels out as pre-annotated tasks, corrected labels back in."""
