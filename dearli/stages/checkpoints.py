"""A Ray Train stage's checkpoints: rank 0 writes the run's ``checkpoints/`` and reports every checkpoint
to Ray Train, so that a replaced worker group, or a rerun with ``--resume`` (same run name and storage),
continues from the newer of the two.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from dearli.config import Config
from dearli.training.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from dearli.training.run_dir import METRICS_FILE

CHECKPOINT_FILE = "state.pt"  # the dearli checkpoint inside a Ray Train checkpoint directory


def report_checkpoint(rank: int, run_dir: Path, step: int, metrics: dict[str, Any], write) -> None:
    """Every rank calls this (it is a barrier); rank 0 writes the checkpoint with ``write(folder)``.

    The same file is kept in the run's ``checkpoints/`` (what ``dearli predict`` and the next stage read)
    and handed to Ray Train, which restores it after a worker failure or on ``--resume``.
    """
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp))
        os.replace(path, Path(tmp) / CHECKPOINT_FILE)
        kept = checkpoint_path(run_dir, step)
        if not kept.exists():  # a step repeated after a failure is already kept
            kept.parent.mkdir(parents=True, exist_ok=True)
            tmp_kept = kept.with_name(kept.name + f".tmp{os.getpid()}")
            tmp_kept.write_bytes((Path(tmp) / CHECKPOINT_FILE).read_bytes())
            os.replace(tmp_kept, kept)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def write_stage_checkpoint(folder: Path, step: int, model: torch.nn.Module, cfg: Config, optimizer, scheduler,
                           extra: dict[str, Any]) -> Path:
    """A dearli checkpoint file in ``folder``; returns its path."""
    return save_checkpoint(folder, step, model, cfg, optimizer, scheduler, extra=extra)


def latest_stage_checkpoint(device: torch.device, run_dir: Path) -> dict[str, Any] | None:
    """The payload to resume from after a worker failure or on ``--resume``, if any.

    Rank 0 writes each checkpoint into the run's ``checkpoints/`` before reporting it to Ray Train, and the
    controller registers a report only when it next polls the workers: a worker killed in between leaves
    the newest checkpoint in the run directory alone. So the newer of the two is used.
    """
    import ray.train

    from dearli.training.checkpoint import latest_checkpoint

    candidates = []
    if (own := latest_checkpoint(run_dir)) is not None:
        candidates.append(load_checkpoint(own, device))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            candidates.append(load_checkpoint(Path(folder) / CHECKPOINT_FILE, device))
    payload = max(candidates, key=lambda payload: payload["step"]) if candidates else None
    if payload is not None and ray.train.get_context().get_world_rank() == 0:
        # FollowMetrics turns it into the driver's "resumed from checkpoint step N" line.
        with open(run_dir / METRICS_FILE, "a") as fh:
            fh.write(f'{{"step": {int(payload["step"])}, "resumed": true}}\n')
    return payload
