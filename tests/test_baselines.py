"""Zero-shot baselines from caches: the ground-truth-mask oracle and SAM+CLIP panoptic merging."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_caches import make_dataset  # the fabricated dataset shared with the cache tests

from dearli.baselines.oracle import oracle_panoptic
from dearli.baselines.sam_clip import SamClipOptions, merge_masks
from dearli.caches.clip_features import clip_settings, write_text_table
from dearli.caches.commands import image_rows
from dearli.caches.generators import GeneratorSpec
from dearli.caches.store import CacheStore, new_run_id
from dearli.caches.workers import ClipWorker, SamWorker
from dearli.cli import main
from dearli.data.coco_format import rgb2id
from dearli.errors import DataError


def _build_caches(data, tmp_path, split="val"):
    """SAM (Felzenszwalb) and CLIP (tiny random backbone) caches, computed in-process without Ray."""
    info, rows = image_rows(str(data), split)
    batch = {key: np.array([r[key] for r in rows], dtype=object) for key in rows[0]}
    spec = GeneratorSpec(kind="felzenszwalb", felzenszwalb_min_size=40)
    settings = clip_settings("dearli-convnext-atto", "", 64, 512, 32)
    sam_uri, clip_uri = str(tmp_path / "sam"), str(tmp_path / "clip")
    for uri, kind, opts, worker in ((sam_uri, "sam", spec.settings(), SamWorker),
                                    (clip_uri, "clip", settings, ClipWorker)):
        CacheStore(uri).open_for_writing(kind, opts)
        run_id = new_run_id()
        arg = dataclasses.asdict(spec) if kind == "sam" else settings
        status = worker(uri, run_id, arg)(batch)
        assert set(status["status"]) == {"done"}
    write_text_table(clip_uri, settings, info.categories)
    return sam_uri, clip_uri


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    data = make_dataset(root / "ds", num_images=4, split="val", seed=5)
    return data, *_build_caches(data, root)


def test_oracle_panoptic_merges_stuff_only():
    masks = np.zeros((3, 4, 4), bool)
    masks[0, :2], masks[1, 2:, :2], masks[2, 2:, 2:] = True, True, True
    panoptic, segments = oracle_panoptic(masks, [0, 0, 2], thing_ids=(2,))
    assert [s["category_id"] for s in segments] == [0, 2]
    assert set(np.unique(panoptic[masks[0] | masks[1]])) == {1} and set(np.unique(panoptic[masks[2]])) == {2}
    _, segments = oracle_panoptic(masks[1:], [2, 2], thing_ids=(2,))  # two things of one class stay apart
    assert [s["id"] for s in segments] == [1, 2]


def test_merge_masks_score_order_and_overlap():
    masks = torch.zeros(3, 10, 10, dtype=torch.bool)
    masks[0, :, :6] = True  # big, low score
    masks[1, :, 4:] = True  # big, high score: takes the overlap
    masks[2, :, 3:5] = True  # small, lowest score, almost fully covered -> dropped
    probs = torch.tensor([[0.6, 0.4], [0.1, 0.9], [0.5, 0.5]])
    quality = torch.tensor([1.0, 1.0, 0.5])
    panoptic, segments = merge_masks(masks, probs, quality, thing_ids=(0, 1),
                                     options=SamClipOptions(overlap_threshold=0.5))
    assert [s["category_id"] for s in segments] == [0, 1]
    assert (panoptic[:, 4:] == 2).all() and (panoptic[:, :4] == 1).all()


def test_oracle_command_gives_positive_pq(caches, tmp_path, capsys):
    data, _, clip_uri = caches
    out = tmp_path / "oracle"
    assert main(["baseline", "oracle", "--dataset", str(data), "--clip-cache", clip_uri, "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert "recognition accuracy" in line and "over 16 segments" in line
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pq"]["All"]["pq"] > 0
    assert 0 < metrics["accuracy"] <= 1
    # Oracle segments are the ground-truth shapes: every GT pixel is covered by some predicted segment.
    pred = json.loads((out / "panoptic.json").read_text())
    for ann in pred["annotations"]:
        ids = rgb2id(np.array(Image.open(out / "panoptic" / ann["file_name"])))
        gt = rgb2id(np.array(Image.open(data / "annotations" / "panoptic_val" / ann["file_name"])))
        assert ((ids > 0) == (gt > 0)).all()


def test_sam_clip_command_writes_valid_predictions(caches, tmp_path, capsys):
    data, sam_uri, clip_uri = caches
    out = tmp_path / "pred"
    args = ["baseline", "sam-clip", "--dataset", str(data), "--sam-cache", sam_uri, "--clip-cache", clip_uri,
            "--out", str(out)]
    assert main(args) == 0
    assert "PQ" in capsys.readouterr().out
    pred = json.loads((out / "panoptic.json").read_text())
    assert len(pred["annotations"]) == 4
    known = {c["id"] for c in pred["categories"]}
    for ann in pred["annotations"]:
        ids = rgb2id(np.array(Image.open(out / "panoptic" / ann["file_name"])))
        listed = {s["id"] for s in ann["segments_info"]}
        assert listed and set(np.unique(ids)) - {0} == listed
        assert {s["category_id"] for s in ann["segments_info"]} <= known
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["pq"]) >= {"All", "Things", "Stuff"} and metrics["pq"]["All"]["n"] == 4
    assert main(args) == 1  # never overwrites earlier predictions


def test_missing_cache_rows_are_reported(caches, tmp_path):
    from dearli.baselines.sam_clip import run_sam_clip
    from dearli.data.dataset import load_dataset

    data, sam_uri, clip_uri = caches
    other = make_dataset(tmp_path / "other", num_images=5, split="val", seed=5)  # one image more
    with pytest.raises(DataError, match="1 image"):
        run_sam_clip(load_dataset(other), "val", sam_uri, clip_uri, tmp_path / "p")
