"""What every training loop builds before its first step, built in one place: model, criterion, optimizer,
scheduler and loss scaler on one device (supervised training, the DeWa warm-up, the Mean-Teacher student and
``dearli bench step``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dearli.config import Config
from dearli.losses.criterion import build_criterion
from dearli.model.m2f_lang import build_m2f_lang
from dearli.training.checkpoint import restore
from dearli.training.optim import build_optimizer, build_poly_scheduler
from dearli.training.step import make_grad_scaler, train_step


@dataclass
class TrainingParts:
    model: nn.Module  # M2F-Lang on ``device``
    criterion: nn.Module  # SetCriterion on ``device``
    optimizer: torch.optim.Optimizer
    scheduler: Any  # poly LR over the loop's steps
    scaler: torch.amp.GradScaler  # a no-op unless fp16 autocast
    device: torch.device

    def restore(self, payload: dict[str, Any]) -> int:
        """Model, optimizer and scheduler from a checkpoint payload; returns its step."""
        return restore(self.model, payload, self.optimizer, self.scheduler)

    def train_step(self, batch: dict[str, Any], cfg: Config, model: nn.Module | None = None) -> dict[str, float]:
        """One supervised step on ``batch`` through ``model`` (default ``self.model``; a DDP wrapper of it in
        a Ray Train worker); returns the logged numbers."""
        return train_step(model or self.model, self.criterion, self.optimizer, batch, cfg, self.scaler, self.device)


def build_training_parts(cfg: Config, class_names: list[Any], num_classes: int, device: torch.device,
                         max_steps: int, amp: bool, seed: int | None = None) -> TrainingParts:
    """The parts of a loop of ``max_steps`` steps for a vocabulary of ``class_names`` (synonym lists).

    The random state is seeded with ``seed`` (default ``cfg.train.seed``) first: a random backbone (the tiny
    presets') is then the same in every process and stage.
    """
    torch.manual_seed(cfg.train.seed if seed is None else seed)
    model = build_m2f_lang(cfg.model, class_names).to(device)
    criterion = build_criterion(cfg.model.loss, num_classes).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_poly_scheduler(optimizer, max_steps, cfg.optim.poly_power)
    return TrainingParts(model, criterion, optimizer, scheduler, make_grad_scaler(device, amp), device)
