"""One optimisation step, shared by the supervised loop, the Ray stages and ``dearli bench step``."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from dearli.config import Config
from dearli.losses.criterion import total_loss
from dearli.training.optim import clip_gradients


def autocast_for(device: torch.device, enabled: bool):
    """Mixed precision on GPUs (bf16 where supported, else fp16); full precision on the CPU."""
    if device.type != "cuda" or not enabled:
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def make_grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """A loss scaler for fp16 autocast; a no-op scaler elsewhere (bf16 and fp32 need none)."""
    fp16 = device.type == "cuda" and enabled and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler("cuda", enabled=fp16)


def move_batch(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Images as float B×3×H×W in [0, 255]; target masks as float N×H×W on ``device``."""
    images = batch["images"].to(device, non_blocking=True).float()
    targets = [{"labels": t["labels"].to(device), "masks": t["masks"].to(device).float()}
               for t in batch["targets"]]
    return images, targets


def train_step(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, Any],
               cfg: Config, scaler: torch.amp.GradScaler, device: torch.device) -> dict[str, float]:
    """Forward, loss, backward, clipping and optimizer step for one batch; returns the logged numbers."""
    model.train()
    images, targets = move_batch(batch, device)
    with autocast_for(device, cfg.train.amp):
        outputs = model(images)
    # Losses in fp32: the point-sampled BCE and dice are sensitive to fp16 rounding.
    outputs = outputs_to_float(outputs)
    losses = criterion(outputs, targets)
    loss = total_loss(losses)
    grad_norm = optimizer_step(loss, model, optimizer, scaler, cfg.optim.clip_grad)
    return {"loss": float(loss.detach()), "grad_norm": grad_norm, **loss_terms(losses)}


def optimizer_step(loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, clip_grad: float) -> float:
    """Backward of ``loss``, gradient clipping (on unscaled gradients) and the optimizer step: the one update
    of every training loop. Returns the gradient norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = clip_gradients(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    return grad_norm


def loss_terms(losses: dict[str, torch.Tensor], suffix: str = "") -> dict[str, float]:
    """The final layer's loss terms to log ({"loss_ce", "loss_mask", "loss_dice"} + ``suffix``)."""
    return {f"{key}{suffix}": float(losses[key].detach()) for key in ("loss_ce", "loss_mask", "loss_dice")
            if key in losses}


def outputs_to_float(outputs: Any) -> Any:
    """Floating tensors of a (nested) model output in fp32; other values unchanged."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {k: outputs_to_float(v) for k, v in outputs.items()}
    if isinstance(outputs, list):
        return [outputs_to_float(v) for v in outputs]
    return outputs
