"""Checkpoints: model, optimiser, scheduler, step and config in a ``torch.load(weights_only=True)``-safe file.

Only tensors, numbers, strings, lists and dicts go in, so loading never unpickles code. Files are
written to a temporary name and renamed, so a crash never leaves a truncated checkpoint that looks
finished, and an existing checkpoint is never overwritten.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dearli.config import Config
from dearli.config_io import from_dict, to_dict
from dearli.errors import DataError

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{7,})\.pt$")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive; every dearli checkpoint starts with this


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}.pt"


def model_state(model: nn.Module, include_backbone: bool) -> dict[str, torch.Tensor]:
    """The model's state dict, without the frozen backbone when it can be rebuilt from its source."""
    state = model.state_dict()
    if include_backbone:
        return state
    return {k: v for k, v in state.items() if not k.startswith("backbone.")}


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, config: Config,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``checkpoints/step_NNNNNNN.pt`` atomically; refuses to replace an existing file.

    The frozen backbone is stored only when it was randomly initialised (``pretrained: ""``): a
    pretrained one is rebuilt from its tag or path, which keeps checkpoints small.
    """
    path = checkpoint_path(run_dir, step)
    if path.exists():
        raise DataError(path, "checkpoint already exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": model_state(model, include_backbone=config.model.backbone.pretrained == ""),
        "step": int(step),
        "config": to_dict(config),
        "extra": extra or {},
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        payload["scheduler"] = scheduler.state_dict()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``); its ``config`` comes back as a :class:`Config`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "checkpoint not found")
    try:
        # torch's warnings about unusual pickles in a damaged file are noise once the error below says why.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types (OSError, RuntimeError, UnpicklingError, KeyError, ...)
        # Not chained: torch's message advises weights_only=False, which would let a hostile file run code.
        raise DataError(path, _unreadable(path, err)) from None
    for warning in caught:  # a readable file keeps its warnings
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise DataError(path, "not a dearli checkpoint (no model/config entries)")
    payload["config"] = from_dict(Config, payload["config"])
    return payload


def _unreadable(path: Path, err: Exception) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in one line without torch's advice."""
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    if not head:
        return "empty file, not a checkpoint"
    if head != _ZIP_MAGIC:
        return "not a checkpoint: not a PyTorch zip archive (damaged, or another kind of file)"
    if isinstance(err, pickle.UnpicklingError):
        return ("not a dearli checkpoint: it holds Python objects other than tensors, numbers, strings, lists and "
                "dicts (damaged, or written by other code), and dearli never unpickles those")
    return "damaged or truncated checkpoint: its zip archive cannot be read"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step under ``run_dir/checkpoints``, if any."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return max(found)[1] if found else None


def restore(model: nn.Module, payload: dict[str, Any], optimizer: torch.optim.Optimizer | None = None,
            scheduler: Any = None) -> int:
    """Load a checkpoint payload into live objects; returns its step."""
    missing, unexpected = model.load_state_dict(payload["model"], strict=False)
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise DataError(None, f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if optimizer is not None and "optimizer" in payload:
        optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and "scheduler" in payload:
        scheduler.load_state_dict(payload["scheduler"])
    return int(payload["step"])
