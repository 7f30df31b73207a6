"""Overlays, side-by-side pictures, loss curves and ``dearli predict --visualize``."""

from __future__ import annotations

import json
import shutil

import numpy as np
from _tiny_model import KEEP_EVERY_QUERY, tiny_checkpoint
from PIL import Image

from dearli.cli import main
from dearli.data.dataset import load_dataset
from dearli.evaluation.visualize import (
    BLEND,
    MIN_PANEL_HEIGHT,
    overlay,
    plot_loss_curve,
    segment_colour,
    write_visualisations,
)

SYNTH = {"num_images": 4, "seed": 2, "num_val": 3}  # conftest's synth fixture


def test_overlay_changes_segments_only():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    panoptic = np.zeros((48, 64), dtype=np.int64)
    panoptic[:20, :30] = 3
    panoptic[25:, 10:] = 7
    out = overlay(image, panoptic, [{"id": 3, "category_id": 1}, {"id": 7, "category_id": 2}], {1: "a", 2: "b"})
    assert out.shape == image.shape and out.dtype == np.uint8
    void = panoptic == 0
    assert np.array_equal(out[void], image[void])
    changed = np.any(out != image, axis=-1)
    assert changed[panoptic == 3].mean() > 0.99 and changed[panoptic == 7].mean() > 0.99
    # a segment's inside (away from borders and names) is the image blended with its colour
    expected = (1 - BLEND) * image[2, 2].astype(float) + BLEND * np.array(segment_colour(3))
    assert np.abs(out[2, 2].astype(float) - expected).max() <= 1


def test_overlay_writes_class_names_at_segment_centres():
    image = np.full((128, 160, 3), 120, dtype=np.uint8)
    panoptic = np.zeros((128, 160), dtype=np.int64)
    panoptic[10:118, 10:150] = 1
    segments = [{"id": 1, "category_id": 5}]
    named = overlay(image, panoptic, segments, {5: "giraffe"})
    fill = np.round((1 - BLEND) * 120 + BLEND * np.array(segment_colour(1), dtype=float))
    centre = named[54:74, 60:100].astype(float)
    assert (np.abs(centre - fill).max(-1) > 40).mean() > 0.3  # dark box and white letters, not the fill
    corner = named[15:30, 15:40].astype(float)  # far from the name: plain fill
    assert np.abs(corner - fill).max() <= 1
    assert np.array_equal(named[11:20, 11], named[11:20, 12])  # uniform fill inside, borders only at edges
    assert (named[10, 10:150] == 255).all()  # the segment's border


def test_write_visualisations_and_predict_visualize(synth, tmp_path, capsys):
    split = load_dataset(synth).split("val")
    gt_json, gt_dir = split.json_path, split.records[0].panoptic_path.parent
    # predictions identical to the ground truth: the prediction panel must equal the ground-truth panel
    written = write_visualisations(split, gt_json, gt_dir, tmp_path / "vis", max_images=2)
    assert [p.name for p in written] == [f"{r.stem}.png" for r in split.records[:2]]
    picture = np.asarray(Image.open(written[0]))
    side = MIN_PANEL_HEIGHT  # 64-px images are enlarged 4x
    assert picture.shape == (22 + side, 3 * side + 2 * 6, 3)
    panels = [picture[22:, i * (side + 6): i * (side + 6) + side] for i in range(3)]
    assert np.array_equal(panels[1], panels[2]) and not np.array_equal(panels[0], panels[1])
    assert np.array_equal(panels[0][::4, ::4], split.load_image(split.records[0]))

    checkpoint = tiny_checkpoint(tmp_path / "run", synth, KEEP_EVERY_QUERY, record_dataset=True, step=0, seed=1)
    shutil.rmtree(tmp_path / "vis")
    assert main(["predict", "--checkpoint", str(checkpoint), "--dataset", str(synth), "--out",
                 str(tmp_path / "pred"), "--visualize", "2"]) == 0
    assert "(2 images)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "pred" / "vis").iterdir()) == [f"{r.stem}.png"
                                                                          for r in split.records[:2]]


def test_plot_loss_curve(tmp_path):
    records = [{"step": s, "loss": 5.0 / s, "loss_ce": 1.0 / s, "lr": 0.1} for s in range(1, 6)]
    records.insert(3, {"step": 3, "eval": {"PQ": 1.0}})
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = plot_loss_curve(metrics, tmp_path / "plots" / "loss.png")
    assert out == tmp_path / "plots" / "loss.png"
    with Image.open(out) as img:
        assert img.size == (700, 400)
        pixels = np.asarray(img.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # lines, axes, legend: not a blank canvas
    metrics.write_text(json.dumps({"step": 1, "eval": {"PQ": 1.0}}) + "\n")
    assert plot_loss_curve(metrics, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
