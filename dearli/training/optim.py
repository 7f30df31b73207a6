"""Optimiser, learning-rate schedule and gradient clipping as Mask2Former and DEARLi train.

AdamW with weight decay on every trainable parameter except those of normalisation layers and
embeddings, exactly upstream's rule (by module type): so the classifier's temperature ``logit_scale``
and the deformable encoder's ``level_embed``, bare parameters upstream as here, ARE decayed, while the
query and level embeddings of the transformer decoder (``nn.Embedding``) are not. Then a poly schedule
and clipping of the gradient norm over the whole model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from dearli.config import OptimConfig

# Module types whose parameters are exempt from weight decay (upstream's norm_module_types + nn.Embedding).
_NO_DECAY_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
                     nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm,
                     nn.Embedding)
# Bare parameters that are an nn.Embedding upstream: the classifier's void embedding (held here as a
# Parameter so checkpoints keep their key).
_NO_DECAY_NAMES = ("void_embedding",)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed group."""
    decay, no_decay, seen = [], [], set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{name}" if module_name else name
            exempt = isinstance(module, _NO_DECAY_MODULES) or full.endswith(_NO_DECAY_NAMES)
            (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)


def build_poly_scheduler(optimizer: torch.optim.Optimizer, max_steps: int, power: float
                         ) -> torch.optim.lr_scheduler.LambdaLR:
    """lr(step) = lr0 · (1 - step / max_steps) ** power."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1.0 - step / max_steps) ** power)


def clip_gradients(parameters: Iterable[torch.Tensor], max_norm: float) -> float:
    """Clip the global gradient norm (Mask2Former's "full_model" clipping); returns the norm before clipping."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    if max_norm <= 0:
        return float(torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params])))
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
