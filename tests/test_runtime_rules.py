"""One rule each for what the Ray stages used to decide in several places: the device, the batch split."""

from __future__ import annotations

import pytest
import torch

from dearli.config import load_config
from dearli.device import resolve_device
from dearli.errors import ConfigError
from dearli.stages import common


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="'gpu7' is not a device"):
        resolve_device("gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="'cuda:1' asked for, but no CUDA device"):
            resolve_device("cuda:1")


def test_train_device_reaches_the_ray_stages():
    # train.device used to be ignored by the Ray stages: they always took Ray Train's device.
    assert common.worker_device(load_config("tiny", ["train.device=cpu"])) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            common.worker_device(load_config("tiny", ["train.device=cuda"]))


def test_one_batch_split_for_every_stage():
    # Rounded up: 16 on 3 workers is 6 each (18 a step), never 5 (15); at least one image per worker.
    assert [common.per_rank(16, w) for w in (1, 2, 3, 4, 32)] == [16, 8, 6, 4, 1]
    assert common.batch_note(16, 4) == ""
    assert common.batch_note(16, 3) == " (effective batch 18: 6 per worker on 3 workers)"
    assert common.batch_note(2, 4, "labeled batch") == " (effective labeled batch 4: 1 per worker on 4 workers)"
