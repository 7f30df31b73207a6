"""Supervised training of M2F-Lang on the labeled partition of a dataset (single process).

The loop the Ray Train stages reuse piece by piece: data, step, checkpointing and evaluation each
live in their own module; this file only wires them together for one process.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from dearli.config import Config, supervised_config
from dearli.data.dataset import load_dataset
from dearli.device import resolve_device
from dearli.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from dearli.training.data import PanopticTrainDataset, collate, infinite_batches
from dearli.training.evaluator import evaluate_model
from dearli.training.hooks import EvalHook, Periodic, PeriodicCheckpointer
from dearli.training.loop import TrainLoop
from dearli.training.parts import build_training_parts
from dearli.training.run_dir import append_metrics, prepare_run_dir


def labeled_stems(info: Any, cfg: Config) -> list[str]:
    """The training images with labels: the partition's list, or the whole train split."""
    split = info.split(cfg.data.train_split)
    if not cfg.data.partition:
        return split.stems
    return list(info.partition(cfg.data.partition).labeled)


def evaluate_and_log(model: torch.nn.Module, cfg: Config, info: Any, run_dir: Path, step: int,
                     echo=print) -> dict[str, Any]:
    """Evaluate on the validation split into ``eval/step_N/`` and append the summary to metrics.jsonl."""
    out_dir = run_dir / "eval" / f"step_{step:07d}"
    if (out_dir / "metrics.json").is_file():  # a resumed, finished run: keep the evaluation it has
        echo(f"step {step} was evaluated before: {out_dir / 'metrics.json'}")
        return json.loads((out_dir / "metrics.json").read_text())
    metrics = evaluate_model(model, cfg.model, info, cfg.data.val_split, out_dir,
                             gt_cache_dir=run_dir / "eval" / "gt_cache")
    append_metrics(run_dir, {"step": step, "eval": metrics["summary"]})
    echo(f"evaluation at step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics["summary"].items()))
    return metrics


def train_supervised(cfg: Config, run_dir: str | Path, resume: bool = False, evaluate: bool = True,
                     echo=print) -> dict[str, Any]:
    """Train on the labeled images of ``cfg.data`` and evaluate on its validation split.

    Returns:
        {"step": last step, "checkpoint": path, "metrics": evaluation dict or None}
    """
    cfg = supervised_config(cfg)  # the preset's per-partition schedule (train.supervised_steps), if any
    run_dir = prepare_run_dir(run_dir, cfg, resume)
    info = load_dataset(cfg.data.dataset)
    split = info.split(cfg.data.train_split)
    stems = labeled_stems(info, cfg)
    device = resolve_device(cfg.train.device)
    parts = build_training_parts(cfg, info.categories.synonyms, info.categories.num_classes, device,
                                 cfg.train.max_steps, cfg.train.amp)
    model, optimizer, scheduler = parts.model, parts.optimizer, parts.scheduler
    step = 0
    if resume and (last := latest_checkpoint(run_dir)) is not None:
        step = parts.restore(load_checkpoint(last, device))
        echo(f"resumed from {last} at step {step}")
    dataset = PanopticTrainDataset(split, stems, cfg.data, seed=cfg.train.seed)
    loader = DataLoader(dataset, batch_size=min(cfg.train.batch_size, len(dataset)), shuffle=True, drop_last=True,
                        collate_fn=collate, num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.train.seed))
    echo(f"training on {len(stems)} labeled images of {cfg.data.dataset} ({info.categories.num_classes} classes), "
         f"device {device}, {cfg.train.max_steps} steps")
    started = time.perf_counter()

    def log(at: int, logged: dict[str, float]) -> None:
        logged.update(step=at, lr=optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - started)
        append_metrics(run_dir, logged)
        echo(f"step {at}/{cfg.train.max_steps} loss {logged['loss']:.3f} ({logged['seconds']:.0f}s)")

    checkpointer = PeriodicCheckpointer(cfg.train.checkpoint_every,
                                        lambda at, _: save_checkpoint(run_dir, at, model, cfg, optimizer, scheduler),
                                        last=latest_checkpoint(run_dir))
    evaluation = EvalHook(cfg.train.eval_every if evaluate else 0,
                          lambda at: evaluate_and_log(model, cfg, info, run_dir, at, echo), final=evaluate)
    loop = TrainLoop(scheduler, cfg.train.max_steps, step, [Periodic(cfg.train.log_every, log), checkpointer,
                                                             evaluation])
    step = loop.run(infinite_batches(loader, dataset),
                    lambda batch: parts.train_step(batch, cfg))
    last_path, metrics = checkpointer.last, evaluation.result
    return {"step": step, "checkpoint": str(last_path) if last_path else None, "metrics": metrics}
