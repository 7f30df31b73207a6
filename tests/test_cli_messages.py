"""What the command line tells a user: no false warning about random weights, one-line checkpoint errors."""

import logging
import os
import warnings

import numpy as np
import pytest
import torch

from dearli.caches.clip_features import build_cache_backbone
from dearli.cli import main

RANDOM_INIT = "No pretrained weights loaded"  # open_clip's warning when it builds a model without weights
TINY_CLIP = "dearli-convnext-atto"
CHECKPOINT = {"overrides": ["model.inference.test_short_side=64"]}  # conftest's checkpoint fixture, of small_world


@pytest.fixture(scope="module")
def world(small_world):
    return small_world  # conftest's 4-image world, written once per session


def _random_init_records(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(RANDOM_INIT)]


def test_predict_from_a_checkpoint_says_nothing_about_random_weights(world, checkpoint, tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO)
    assert main(["predict", "--checkpoint", str(checkpoint), "--dataset", str(world), "--out",
                 str(tmp_path / "pred")]) == 0
    captured = capsys.readouterr()
    assert _random_init_records(caplog) == []
    assert RANDOM_INIT not in captured.err + captured.out
    assert "PQ" in captured.out
    # what was logged instead is true whatever comes next: the config asked for no pretrained weights
    notes = [r.getMessage() for r in caplog.records if r.name == "dearli.model.backbone"]
    assert notes == [f"CLIP {TINY_CLIP} built without pretrained weights (model.backbone.pretrained is empty)"]


def test_cache_backbone_of_the_baselines_is_quiet_and_the_filter_is_removed(caplog):
    caplog.set_level(logging.WARNING)
    build_cache_backbone(TINY_CLIP, "")
    assert _random_init_records(caplog) == []
    # the filter lived for the build only: the same record logged afterwards reaches the handlers
    logging.warning(f"{RANDOM_INIT} for model 'x'. Model initialized randomly.")
    assert len(_random_init_records(caplog)) == 1
    assert logging.getLogger().filters == []


def _truncated(checkpoint, path):
    path.write_bytes(checkpoint.read_bytes()[:4096])
    return path


def _random_bytes(seed, prefix=b""):
    def make(_, path):
        path.write_bytes(prefix + np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes())
        return path
    return make


def _foreign_object(_, path):
    torch.save({"model": {"w": torch.zeros(2)}, "config": {}, "extra": warnings.WarningMessage}, path)
    return path


@pytest.mark.parametrize(("make", "reason"), [
    (_truncated, "damaged or truncated checkpoint"),
    (_random_bytes(0), "not a PyTorch zip archive"),
    (_random_bytes(1), "not a PyTorch zip archive"),
    (_random_bytes(7, prefix=b"\x80\xab"), "not a PyTorch zip archive"),  # torch also warns about "protocol 171"
    (_foreign_object, "never unpickles"),
])
def test_corrupt_checkpoint_is_one_line_without_weights_only_advice(make, reason, world, checkpoint, tmp_path,
                                                                     capsys):
    bad = make(checkpoint, tmp_path / "bad.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["predict", "--checkpoint", str(bad), "--dataset", str(world), "--out", str(tmp_path / "p")])
    captured = capsys.readouterr()
    assert code == 1
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"dearli predict: error: {bad}: ")
    assert reason in lines[0]
    everything = captured.out + captured.err + "".join(str(w.message) for w in caught)
    assert "weights_only" not in everything
    assert not (tmp_path / "p").exists()


def test_empty_and_missing_checkpoints(world, tmp_path, capsys):
    empty = tmp_path / "empty.pt"
    empty.touch()
    assert main(["predict", "--checkpoint", str(empty), "--dataset", str(world), "--out", str(tmp_path / "p")]) == 1
    assert capsys.readouterr().err.strip() == f"dearli predict: error: {empty}: empty file, not a checkpoint"
    missing = os.path.join(tmp_path, "nowhere.pt")
    assert main(["predict", "--checkpoint", missing, "--dataset", str(world), "--out", str(tmp_path / "p")]) == 1
    assert capsys.readouterr().err.strip() == f"dearli predict: error: {missing}: checkpoint not found"
