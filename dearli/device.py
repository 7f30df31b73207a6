"""The one place that chooses a torch device: ``auto`` is the first GPU this process can see, else the CPU.

Inside a Ray actor or Train worker that was given GPUs, the scheduler exposes exactly those GPUs, so ``auto``
there is the actor's own GPU.
"""

from __future__ import annotations

import torch

from dearli.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a device; a CUDA name without CUDA is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device: {name!r} is not a device (auto, cpu, cuda or cuda:N)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for, but no CUDA device is available here")
    return device
