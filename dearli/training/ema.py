"""The Mean-Teacher teacher: an exponential moving average (EMA) of the student.

teacher ← decay·teacher + (1 − decay)·student, over every parameter and floating buffer of the decoder;
integer buffers (counters, index tables) are copied. The frozen CLIP backbone is never averaged or copied:
:func:`make_teacher` gives the teacher the student's own backbone object, so one set of backbone weights
serves both (it is the bulk of the model: 6.7M of 7M parameters in ``tiny``, far more in ``base``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# Submodule that teacher and student share; its parameters and buffers are skipped by the EMA.
SHARED_PREFIX = "backbone"


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or DataParallel) wrapper; the model itself otherwise."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def _is_shared(name: str, shared_prefix: str) -> bool:
    return name == shared_prefix or name.startswith(shared_prefix + ".")


def make_teacher(student: nn.Module, shared_prefix: str = SHARED_PREFIX) -> nn.Module:
    """A deep copy of ``student`` (in eval mode, no parameter requiring grad) sharing its frozen backbone.

    The backbone module and its tensors are pre-seeded in ``deepcopy``'s memo, so the copy refers to the very
    same objects instead of duplicating them (and anything else pointing at them keeps pointing at them).
    """
    student = unwrap(student)
    backbone = student.get_submodule(shared_prefix)
    memo: dict[int, object] = {id(backbone): backbone}
    for tensor in list(backbone.parameters()) + list(backbone.buffers()):
        memo[id(tensor)] = tensor
    teacher = copy.deepcopy(student, memo)
    for name, param in teacher.named_parameters():
        if not _is_shared(name, shared_prefix):
            param.requires_grad_(False)
    return teacher.eval()


def ema_decay(step: int, decay: float, ramp: bool) -> float:
    """The EMA decay used after student step ``step`` (0-based).

    With ``ramp`` (a student that starts without warm-up) the decay is min(1 − 1/(step + 1), decay): 0 at
    step 0 (the teacher becomes the student), 0.5 at step 1, ... until it reaches ``decay``; so a randomly
    initialised teacher is forgotten quickly. Without it, ``decay`` from the first step.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return min(1.0 - 1.0 / (step + 1), decay) if ramp else decay


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, shared_prefix: str = SHARED_PREFIX) -> None:
    """teacher ← decay·teacher + (1 − decay)·student in place, for parameters and floating buffers.

    Integer/bool buffers are copied from the student. Names under ``shared_prefix`` (the frozen backbone)
    are left alone. Both models must have the same architecture (a DDP wrapper on either is unwrapped).
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must lie in [0, 1], got {decay}")
    teacher, student = unwrap(teacher), unwrap(student)
    student_tensors = dict(student.named_parameters())
    student_tensors.update(student.named_buffers())
    for name, tensor in list(teacher.named_parameters()) + list(teacher.named_buffers()):
        if _is_shared(name, shared_prefix):
            continue
        source = student_tensors.get(name)
        if source is None or source.shape != tensor.shape:
            got = "missing" if source is None else f"shape {tuple(source.shape)}"
            raise ValueError(f"EMA: teacher tensor {name} {tuple(tensor.shape)} has no match in the student "
                             f"({got})")
        if tensor.is_floating_point():
            # lerp: t + (1 - decay)·(s - t); it keeps tensors that are equal in both models exactly equal
            # (e.g. the text-embedding buffers), where decay·t + (1 - decay)·s could drift by rounding.
            tensor.lerp_(source.detach().to(tensor.dtype), 1.0 - decay)
        else:
            tensor.copy_(source)


def trainable_state(model: nn.Module, shared_prefix: str = SHARED_PREFIX) -> dict[str, torch.Tensor]:
    """The model's state_dict without the shared backbone: what a teacher replica needs to follow the EMA.

    Detached CPU copies, so the result can be published (e.g. to another process) while training goes on.
    """
    state = unwrap(model).state_dict()
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items() if not _is_shared(k, shared_prefix)}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor],
                         shared_prefix: str = SHARED_PREFIX) -> None:
    """Load a :func:`trainable_state` into ``model``, keeping its own backbone; every other key must match."""
    model = unwrap(model)
    expected = {k for k in model.state_dict() if not _is_shared(k, shared_prefix)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"trainable state does not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)
