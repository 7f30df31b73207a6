"""The model a command or an endpoint was given: a ``--checkpoint`` argument as a file (a path, or a model in
MLflow's registry), the SHA-256 that names its weights, and the class list it labels with."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def checkpoint_file(checkpoint: str) -> str:
    """A --checkpoint argument as a file: a registered MLflow model (models:/NAME/N, runs:/...) is looked up,
    a path is returned as it is."""
    if checkpoint.startswith(("models:/", "runs:/")):  # MLflow only when asked for: it is slow to import
        from dearli.stages.registry import resolve_checkpoint

        return str(resolve_checkpoint(checkpoint))
    return checkpoint


def resolve_classes(classes_file: str | None, cfg: Any) -> Any:
    """The CategoryMap to label with: ``--classes``, else the class list of the checkpoint's dataset."""
    from dearli.data.classes import read_classes_json
    from dearli.data.dataset import load_dataset
    from dearli.data.panoptic import CategoryMap
    from dearli.errors import ConfigError, DataError

    if classes_file:
        return CategoryMap(read_classes_json(classes_file), classes_file)
    if not cfg.data.dataset:
        raise ConfigError("--classes: the checkpoint names no dataset (data.dataset) to take classes from")
    try:
        return load_dataset(cfg.data.dataset).categories
    except DataError as err:
        raise ConfigError(f"--classes: the checkpoint's dataset {cfg.data.dataset} cannot be read here "
                          f"({err}); pass the class list with --classes FILE") from None


def checkpoint_digest(path: str | Path) -> str:
    """The SHA-256 of a checkpoint file (hex): what names a model version by its weights."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
