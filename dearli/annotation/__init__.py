"""Exchange of labels with annotation tools: Label Studio, CVAT."""
