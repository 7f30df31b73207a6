"""Contrastive pre-training of the project's small open_clip model on the synthetic world.

Plain PyTorch: open_clip's model and its own ``ClipLoss`` (symmetric InfoNCE over the batch, learnable
temperature), AdamW with linear warm-up and cosine decay, pairs from :mod:`dearli.pretrain.pairs`.
The checkpoint is an open_clip state dict (under ``state_dict``, beside the settings that made it), so
``open_clip.create_model(name, pretrained=path)`` and ``model.backbone.pretrained=path`` load it as they
load any pretrained CLIP.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dearli.data.synth.world import SynthWorld
from dearli.errors import ConfigError
from dearli.model.backbone import create_random_clip
from dearli.pretrain.pairs import PairOptions, make_batch
from dearli.training.hooks import Periodic
from dearli.training.loop import FunctionSchedule, TrainLoop

DEFAULT_MODEL = "dearli-convnext-atto"
LOGIT_SCALE_MAX = math.log(100.0)  # open_clip's training clamp of the learnable temperature


@dataclass(frozen=True)
class PretrainOptions:
    """Everything that determines the trained weights (all fields enter the checkpoint's content hash).

    The pair stream's seed is ``seed``; scene indices run from 0, batch after batch, so no scene repeats.
    """

    model: str = DEFAULT_MODEL
    steps: int = 1200
    seed: int = 0
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 100
    layer_scale_init: float = 0.0  # > 0: start every ConvNeXt block's layer scale here instead of timm's 1e-6
    pairs: PairOptions = field(default_factory=PairOptions)

    def validate(self) -> None:
        """ConfigError naming what is impossible (the command line's options are these fields)."""
        if self.steps < 1 or self.batch_size < 2 or self.seed < 0 or self.warmup < 0:
            raise ConfigError("dearli pretrain-clip: steps >= 1, batch_size >= 2, seed >= 0 and warmup >= 0 are "
                              f"required, got steps={self.steps} batch_size={self.batch_size} seed={self.seed} "
                              f"warmup={self.warmup}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ConfigError(f"dearli pretrain-clip: lr must be positive and weight_decay >= 0, got {self.lr}, "
                              f"{self.weight_decay}")
        self.pairs.validate()

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def create_clip(model: str = DEFAULT_MODEL) -> nn.Module:
    """A randomly initialised open_clip model (dearli's configs registered): pre-training starts from it."""
    return create_random_clip(model)


def init_layer_scale(model: nn.Module, value: float) -> int:
    """Set every ConvNeXt block's layer-scale ``gamma`` to ``value``; returns how many were set.

    timm starts them at 1e-6 (residual branches nearly off), made for 300-epoch schedules; a run of a
    few thousand steps spends a good part of them just growing the branches back.
    """
    names = [name for name, _ in model.named_parameters() if name.endswith(".gamma") and ".trunk." in name]
    with torch.no_grad():
        for name in names:
            model.get_parameter(name).fill_(value)
    return len(names)


def lr_at(step: int, options: PretrainOptions) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < options.warmup:
        return options.lr * (step + 1) / options.warmup
    progress = (step - options.warmup) / max(1, options.steps - options.warmup)
    return 0.5 * options.lr * (1 + math.cos(math.pi * progress))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # As open_clip's training: no decay on gains, biases, embeddings and the temperature.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        flat = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name \
            or "embedding" in name or "token" in name
        (no_decay if flat else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _normaliser(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (1×3×1×1, in [0, 255] units) the backbone will use at inference."""
    import open_clip

    cfg = getattr(model.visual, "preprocess_cfg", {})
    mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD)).view(1, 3, 1, 1) * 255.0
    return mean, std


Log = Callable[[int, dict], None]


def train_clip(options: PretrainOptions, log: Log | None = None, log_every: int = 50) -> nn.Module:
    """Train a fresh CLIP for ``options.steps`` steps; returns the model (eval mode, CPU).

    ``log(step, {"loss", "lr", "logit_scale", "seconds"})`` is called every ``log_every`` steps and at the end.
    """
    import open_clip

    options.validate()
    torch.manual_seed(options.seed)
    model = create_clip(options.model)
    if options.layer_scale_init > 0:
        init_layer_scale(model, options.layer_scale_init)
    tokenizer = open_clip.get_tokenizer(options.model)
    loss_fn = open_clip.loss.ClipLoss()
    optimizer = torch.optim.AdamW(_param_groups(model, options.weight_decay), lr=options.lr, betas=(0.9, 0.98),
                                  eps=1e-6)
    mean, std = _normaliser(model)
    world = SynthWorld(options.seed)
    schedule = FunctionSchedule(optimizer, lambda step: lr_at(step, options))
    start = time.perf_counter()

    def step_fn(batch: tuple[torch.Tensor, list[str]]) -> dict[str, float]:
        images, captions = batch
        image_f, text_f, scale = model((images - mean) / std, tokenizer(captions))[:3]
        loss = loss_fn(image_f, text_f, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        return {"loss": float(loss.detach()), "lr": optimizer.param_groups[0]["lr"]}

    def write(at: int, logged: dict[str, float]) -> None:
        log(at, {**logged, "logit_scale": float(model.logit_scale.detach().exp()),
                 "seconds": time.perf_counter() - start})

    batches = (make_batch(world, step * options.batch_size, options.batch_size, options.pairs)
               for step in range(options.steps))
    model.train()
    TrainLoop(schedule, options.steps, hooks=[Periodic(log_every, write)] if log is not None else []).run(
        batches, step_fn)
    return model.eval()
