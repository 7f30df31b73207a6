"""Exchange of labels with annotation tools (Label Studio, CVAT): pseudo-labels out as pre-annotated tasks,
corrected labels back in."""
