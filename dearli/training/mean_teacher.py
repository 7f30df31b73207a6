"""One optimisation step of the Mean-Teacher student: supervised loss + weighted loss on pseudo-labels.

The loss on pseudo-labels is the plain Mask2Former loss (the same criterion, hard targets from
:func:`dearli.training.pseudo_labels.to_targets`), as upstream DEARLi trains its student. Forward, backward,
clipping and the optimizer step are :func:`dearli.training.step.optimizer_step`, as in every loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dearli.config import Config
from dearli.losses.criterion import build_criterion, thing_label_sets, total_loss
from dearli.training.step import autocast_for, loss_terms, move_batch, optimizer_step, outputs_to_float

# The outputs the criterion reads; the rest (query features, dense CLIP features) is not split.
_CRITERION_KEYS = ("pred_logits", "pred_masks")


def split_outputs(outputs: dict, count: int) -> tuple[dict, dict]:
    """The criterion's view of a concatenated batch's outputs: (first ``count`` images, the rest)."""
    def part(out: dict, rows: slice) -> dict:
        return {key: out[key][rows] for key in _CRITERION_KEYS}

    first, rest = slice(None, count), slice(count, None)
    head, tail = part(outputs, first), part(outputs, rest)
    aux = outputs.get("aux_outputs")
    if aux is not None:
        head["aux_outputs"] = [part(a, first) for a in aux]
        tail["aux_outputs"] = [part(a, rest) for a in aux]
    return head, tail


def unlabeled_criterion(cfg: Config, num_classes: int, thing_ids: Sequence[int], criterion: nn.Module) -> nn.Module:
    """The loss on pseudo-labels: ``criterion`` itself unless ``ssl.unlabeled_no_object_weight`` or
    ``ssl.thing_pseudo_classes`` make it differ from the labeled images' loss."""
    ssl = cfg.ssl
    if ssl.unlabeled_no_object_weight < 0 and ssl.thing_pseudo_classes == "teacher":
        return criterion
    loss = cfg.model.loss
    if ssl.unlabeled_no_object_weight >= 0:
        loss = dataclasses.replace(loss, no_object_weight=ssl.unlabeled_no_object_weight)
    sets = thing_label_sets(num_classes, thing_ids) if ssl.thing_pseudo_classes == "any_thing" else None
    return build_criterion(loss, num_classes, sets)


def mean_teacher_step(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                      labeled_batch: dict[str, Any], unlabeled_batch: dict[str, Any] | None, cfg: Config,
                      scaler: torch.amp.GradScaler, device: torch.device, unlabeled_weight: float,
                      criterion_u: nn.Module | None = None) -> dict[str, float]:
    """loss = supervised loss on ``labeled_batch`` + ``unlabeled_weight`` × loss on ``unlabeled_batch``.

    Both batches are in :func:`dearli.training.data.collate`'s format (the unlabeled one from
    :func:`dearli.training.pseudo_labels.collate_pseudo`) with crops of one size: they go through the model
    as ONE concatenated forward, so a DistributedDataParallel model sees one forward per backward.
    Precision is ``cfg.ssl.precision`` (fp32 unless "amp", as upstream trains this stage). ``criterion_u``
    scores the pseudo-labels (default ``criterion``); a weight of 0 or no unlabeled batch (the burn-in)
    leaves the unlabeled images out.

    Returns:
        {"loss", "loss_sup", "loss_unsup", "grad_norm"} and the final layer's terms ("loss_ce", "loss_mask",
        "loss_dice" supervised; the same suffixed "_unsup").
    """
    model.train()
    images_l, targets_l = move_batch(labeled_batch, device)
    # No batch or a weight of 0 (the burn-in) leaves the unlabeled images out of the forward pass altogether.
    unlabeled = unlabeled_batch is not None and unlabeled_weight > 0
    images = images_l
    if unlabeled:
        images_u, targets_u = move_batch(unlabeled_batch, device)
        if images_l.shape[1:] != images_u.shape[1:]:
            raise ValueError(f"labeled images {tuple(images_l.shape[1:])} and unlabeled images "
                             f"{tuple(images_u.shape[1:])} must share one crop size")
        images = torch.cat([images_l, images_u])
    with autocast_for(device, cfg.ssl.precision == "amp"):
        outputs = model(images)
    # Losses in fp32, as train_step: the point-sampled BCE and dice are sensitive to fp16 rounding.
    outputs_l, outputs_u = split_outputs(outputs_to_float(outputs), images_l.shape[0])
    losses_sup = criterion(outputs_l, targets_l)
    losses_unsup = (criterion_u or criterion)(outputs_u, targets_u) if unlabeled else {}
    loss_sup = total_loss(losses_sup)
    loss_unsup = total_loss(losses_unsup) if losses_unsup else torch.zeros((), device=loss_sup.device)
    loss = loss_sup + unlabeled_weight * loss_unsup
    grad_norm = optimizer_step(loss, model, optimizer, scaler, cfg.optim.clip_grad)
    return {"loss": float(loss.detach()), "loss_sup": float(loss_sup.detach()),
            "loss_unsup": float(loss_unsup.detach()), "grad_norm": grad_norm, **loss_terms(losses_sup),
            **loss_terms(losses_unsup, "_unsup")}
