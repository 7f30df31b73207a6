"""``dearli bench annotation``: the annotator's work on pseudo-labels, counted region by region."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from _label_studio_factory import write_pseudo_labels
from _panoptic_factory import DEFAULT_CATEGORIES, FakeImage, random_image, write_dataset

from dearli.bench.annotation import Work, annotator_work
from dearli.cli import main

WALL, PERSON, CAR, SKY = 0, 3, 17, 92


def _truth() -> tuple[np.ndarray, list[tuple[int, int]]]:
    """10×10: wall above, sky below, a person on the wall, two cars on the sky."""
    truth = np.zeros((10, 10), np.int64)
    truth[:5], truth[5:] = 1, 2
    truth[1:4, 1:4] = 3
    truth[6:9, 6:9] = 4
    truth[6:8, 1:3] = 5
    return truth, [(1, WALL), (2, SKY), (3, PERSON), (4, CAR), (5, CAR)]


def test_each_kind_of_edit_is_counted():
    truth, segments = _truth()
    pred = truth.copy()
    pred[pred == 4] = 2
    pred[pred == 5] = 2  # the small car is missed: add
    pred[7:10, 7:10] = 14  # the other car shifted: IoU 4/14, its class: reshape
    pred[0, 9] = 20  # a one-pixel person on the wall: delete
    predicted = [(1, WALL), (2, SKY), (3, CAR), (14, CAR), (20, PERSON)]  # the person called a car: relabel
    assert annotator_work(pred, predicted, truth, segments) == Work(
        keep=2, relabel=1, reshape=1, add=1, delete=1, truth=5, predicted=5)
    assert annotator_work(pred, predicted, truth, segments).edits == 4


def test_exact_labels_need_nothing_and_no_labels_need_everything():
    truth, segments = _truth()
    assert annotator_work(truth, segments, truth, segments) == Work(5, 0, 0, 0, 0, 5, 5)
    assert annotator_work(np.zeros_like(truth), [], truth, segments) == Work(0, 0, 0, 5, 0, 5, 0)
    renumbered = np.where(truth > 0, truth + 100, 0)  # ids do not matter, masks and classes do
    assert annotator_work(renumbered, [(k + 100, c) for k, c in segments], truth, segments).keep == 5


def test_a_poor_mask_of_another_class_is_deleted_and_added_not_reshaped():
    truth, segments = _truth()
    pred = truth.copy()
    pred[pred == 4] = 2
    pred[7:10, 7:10] = 14  # IoU 4/14 with car 4, but called a person
    work = annotator_work(pred, [(1, WALL), (2, SKY), (3, PERSON), (5, CAR), (14, PERSON)], truth, segments)
    assert (work.keep, work.reshape, work.add, work.delete) == (4, 0, 1, 1)


@pytest.fixture
def world(tmp_path):
    rng = np.random.default_rng(5)
    images = [random_image(f"train_{i:03d}", rng, height=24, width=32) for i in range(3)]
    data = write_dataset(tmp_path / "data", {"train": images, "val": images[:1]})
    exact = images[0]
    mistaken = FakeImage(images[1].stem, np.where(images[1].segment_map == 4, 2, images[1].segment_map),
                         {k: v for k, v in images[1].segments.items() if k != 4})  # a thing missed
    labels = write_pseudo_labels(tmp_path / "pseudo", [exact, mistaken], data / "images" / "train",
                                 DEFAULT_CATEGORIES)
    return data, labels, images


def test_the_command_prints_each_image_the_mean_and_the_totals(world, tmp_path, capsys):
    data, labels, images = world
    assert main(["bench", "annotation", "--labels", str(labels), "--dataset", str(data), "--csv",
                 str(tmp_path / "work.csv")]) == 0
    out = capsys.readouterr().out
    n0, n1 = len(images[0].segments), len(images[1].segments)
    rows = {row["stem"]: row for row in csv.DictReader((tmp_path / "work.csv").open())}
    assert rows["train_000"]["keep"] == str(n0) and rows["train_000"]["edits"] == "0"
    assert rows["train_001"]["add"] == "1" and rows["train_001"]["keep"] == str(n1 - 1)
    assert f"2 images: 1 edits with the pseudo-labels ({n0 + n1 - 1} regions kept as predicted) against " \
           f"{n0 + n1} regions drawn from nothing" in out
    assert "mean per image" in out and "train_001" in out

    suggestions = tmp_path / "suggestions.csv"
    suggestions.write_text("rank,stem,combined\n2,train_000,0.1\n1,train_001,0.9\n")
    assert main(["bench", "annotation", "--labels", str(labels), "--dataset", str(data), "--suggestions",
                 str(suggestions), "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "train_001" in out and "train_000" not in out and "1 images: 1 edits" in out


def test_an_image_without_a_pseudo_label_is_an_error(world, capsys):
    data, labels, _ = world
    suggestions = data / "suggestions.csv"
    suggestions.write_text("rank,stem\n1,train_002\n")  # in the dataset, not in the pseudo-labels
    assert main(["bench", "annotation", "--labels", str(labels), "--dataset", str(data), "--suggestions",
                 str(suggestions)]) == 1
    assert "no pseudo-label of 'train_002'" in capsys.readouterr().err


def test_an_image_without_ground_truth_is_an_error(world, capsys):
    from _label_studio_factory import drop_annotations

    data, labels, _ = world
    drop_annotations(data / "annotations" / "panoptic_train.json", {"train_001"})
    assert main(["bench", "annotation", "--labels", str(labels), "--dataset", str(data)]) == 1
    assert "'train_001' has no annotation to compare with" in capsys.readouterr().err
