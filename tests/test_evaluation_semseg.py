"""Semantic metrics: detectron2 SemSegEvaluator rules on hand-computed cases, panoptic -> semantic."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from _reference import read_panoptic_ids, semantic_from_panoptic
from PIL import Image

from dearli.cli import main
from dearli.errors import DataError
from dearli.evaluation.semseg import (
    SemSegEvaluator,
    contiguous_category_ids,
    evaluate_semseg_dirs,
    evaluate_semseg_panoptic,
)

FIXTURES = Path(__file__).parent / "fixtures" / "pq"

# 3 classes; class 2 has no GT pixel (but is predicted once); 255 = ignore
GT = np.array([[0, 0, 0, 1], [1, 1, 255, 255]])
PRED = np.array([[0, 0, 2, 1], [1, 0, 1, 0]])


def test_confusion_matrix_by_hand():
    ev = SemSegEvaluator(3)
    ev.update(PRED, GT)
    expected = np.zeros((4, 4), dtype=np.int64)  # rows = prediction, columns = GT, index 3 = ignore
    expected[0, 0] = 2
    expected[2, 0] = 1
    expected[1, 1] = 2
    expected[0, 1] = 1
    expected[1, 3] = 1
    expected[0, 3] = 1
    np.testing.assert_array_equal(ev.conf, expected)


def test_metrics_by_hand_with_ignore_and_absent_class():
    ev = SemSegEvaluator(3)
    ev.update(PRED, GT)
    m = ev.compute()
    # class 0: tp 2, gt 3, pred 3 -> IoU 2/4, acc 2/3; class 1: tp 2, gt 3, pred 2 -> IoU 2/3, acc 2/3
    assert m["iou"][:2] == pytest.approx([0.5, 2 / 3])
    assert m["acc"][:2] == pytest.approx([2 / 3, 2 / 3])
    assert math.isnan(m["iou"][2]) and math.isnan(m["acc"][2])  # no GT pixels: left out of the means
    assert m["miou"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert m["macc"] == pytest.approx(2 / 3)
    assert m["fwiou"] == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert m["pacc"] == pytest.approx(4 / 6)


def test_updates_accumulate():
    ev = SemSegEvaluator(3)
    ev.update(PRED, GT)
    ev.update(PRED, GT)
    assert ev.conf[0, 0] == 4
    assert ev.compute()["miou"] == pytest.approx((0.5 + 2 / 3) / 2)


def test_ignore_in_prediction_is_a_miss():
    ev = SemSegEvaluator(2)
    ev.update(np.array([255, 0, 1]), np.array([0, 0, 1]))
    m = ev.compute()
    assert m["acc"] == pytest.approx([0.5, 1.0])
    assert m["iou"] == pytest.approx([0.5, 1.0])
    assert m["pacc"] == pytest.approx(2 / 3)


def test_out_of_range_values_are_rejected():
    ev = SemSegEvaluator(3)
    with pytest.raises(ValueError, match=r"values \[3\]"):
        ev.update(np.array([3]), np.array([0]))
    with pytest.raises(ValueError, match="shape"):
        ev.update(np.zeros((2, 2)), np.zeros((2, 3)))


def test_the_reference_semantic_map_of_a_panoptic_map():
    classes = contiguous_category_ids([{"id": 10}, {"id": 3}, {"id": 20}])
    assert classes == {3: 0, 10: 1, 20: 2}
    ids = np.array([[0, 5, 9], [7, 5, 1234]])
    segments = [{"id": 5, "category_id": 10}, {"id": 7, "category_id": 3},
                {"id": 9, "category_id": 10, "iscrowd": 1}]
    # VOID and the unlisted id 1234 -> 255; crowd keeps its class
    np.testing.assert_array_equal(semantic_from_panoptic(ids, segments, classes), [[255, 1, 1], [0, 1, 255]])


def test_panoptic_semseg_equals_pixel_level_evaluation():
    root = FIXTURES / "coco"
    result = evaluate_semseg_panoptic(root / "gt.json", root / "gt", root / "pred.json", root / "pred",
                                      workers=1, progress=False)
    gt = json.loads((root / "gt.json").read_text())
    preds = {a["image_id"]: a for a in json.loads((root / "pred.json").read_text())["annotations"]}
    classes = contiguous_category_ids(gt["categories"])
    ev = SemSegEvaluator(len(classes))
    for ann in gt["annotations"]:
        pred = preds[ann["image_id"]]
        g = semantic_from_panoptic(read_panoptic_ids(str(root / "gt" / ann["file_name"])),
                                   ann["segments_info"], classes)
        p = semantic_from_panoptic(read_panoptic_ids(str(root / "pred" / pred["file_name"])),
                                   pred["segments_info"], classes)
        ev.update(p, g)
    expected = ev.compute()
    for key in ("miou", "fwiou", "macc", "pacc"):
        assert result[key] == pytest.approx(expected[key], abs=1e-12)
    np.testing.assert_allclose(result["iou"], expected["iou"], atol=1e-12)
    assert result["pq"]["All"]["pq"] == pytest.approx(
        json.loads((root / "expected.json").read_text())["All"]["pq"], abs=1e-9)


def test_evaluate_semseg_dirs(tmp_path):
    for sub in ("gt", "pred"):
        (tmp_path / sub).mkdir()
    Image.fromarray(GT.astype(np.uint8)).save(tmp_path / "gt" / "a.png")
    Image.fromarray(PRED.astype(np.uint8)).save(tmp_path / "pred" / "a.png")
    m = evaluate_semseg_dirs(tmp_path / "gt", tmp_path / "pred", 3, progress=False)
    assert m["miou"] == pytest.approx((0.5 + 2 / 3) / 2)
    Image.fromarray(GT.astype(np.uint8)).save(tmp_path / "gt" / "b.png")
    with pytest.raises(DataError, match="PNG file not found") as err:
        evaluate_semseg_dirs(tmp_path / "gt", tmp_path / "pred", 3, progress=False)
    assert err.value.path == str(tmp_path / "pred" / "b.png")


def test_cli_semseg_json(capsys):
    root = FIXTURES / "ade"
    code = main(["evaluate", "--gt-json", str(root / "gt.json"), "--gt-dir", str(root / "gt"),
                 "--pred-json", str(root / "pred.json"), "--pred-dir", str(root / "pred"),
                 "--json", "--semseg", "--workers", "1", "--no-progress"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    expected = evaluate_semseg_panoptic(root / "gt.json", root / "gt", root / "pred.json", root / "pred",
                                        workers=1, progress=False)
    assert result["semseg_pan"]["miou"] == pytest.approx(expected["miou"])
    assert set(result["semseg_pan"]["per_class"]) == {str(c["id"]) for c in
                                                   json.loads((root / "gt.json").read_text())["categories"]}
    assert result["All"]["pq"] == pytest.approx(expected["pq"]["All"]["pq"])
