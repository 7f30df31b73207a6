"""The synthetic panoptic world: determinism, annotation consistency, statistics, writer and CLI."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dearli.cli import main
from dearli.data.coco_format import IGNORE_LABEL, rgb2id
from dearli.data.synth.captions import make_caption, plural
from dearli.data.synth.classes import CLASSES, THING_CLASSES
from dearli.data.synth.shapes import SHAPES, shape_mask
from dearli.data.synth.world import SynthWorld
from dearli.data.synth.writer import PARTITION_FRACTIONS, write_synth_dataset
from dearli.errors import DataError

NUM_TRAIN, NUM_VAL, SIZE = 24, 6, (64, 80)


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def _check_segments(segment_map: np.ndarray, segments: list[dict]) -> None:
    """The map's ids are exactly the listed ids; areas and boxes are measured on the map."""
    present = set(np.unique(segment_map).tolist()) - {0}
    assert present == {s["id"] for s in segments}
    for seg in segments:
        mask = segment_map == seg["id"]
        assert seg["area"] == int(mask.sum())
        assert seg["bbox"] == _bbox(mask)
        assert 0 <= seg["category_id"] < len(CLASSES)
        assert seg["iscrowd"] in (0, 1)
        assert not seg["iscrowd"] or CLASSES[seg["category_id"]].isthing
    stuff = [s["category_id"] for s in segments if not CLASSES[s["category_id"]].isthing]
    assert len(stuff) == len(set(stuff)), "a stuff class must be one segment per image"


@pytest.fixture(scope="module")
def samples() -> list:
    world = SynthWorld(seed=11)
    return [world.sample(i) for i in range(200)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synth_dataset(tmp_path_factory.mktemp("synth") / "ds", NUM_TRAIN, seed=5, num_val=NUM_VAL,
                               image_size=SIZE)


def test_categories_are_words_with_unique_contiguous_ids():
    cats = SynthWorld(0).categories
    assert [c["id"] for c in cats] == list(range(len(cats)))
    assert len({c["name"] for c in cats}) == len(cats)
    assert 10 <= sum(c["isthing"] for c in cats) <= 14 and 5 <= sum(not c["isthing"] for c in cats) <= 6
    colours = Counter(c.name.split()[0] for c in THING_CLASSES)
    shapes = Counter(c.kind for c in THING_CLASSES)
    assert min(colours.values()) >= 2 and sum(n >= 2 for n in shapes.values()) >= 4


def test_sample_is_deterministic_per_seed_and_index(samples):
    fresh = SynthWorld(seed=11)
    for index in (7, 3, 7):  # any order, repeated: same result
        again = fresh.sample(index)
        np.testing.assert_array_equal(again.image, samples[index].image)
        np.testing.assert_array_equal(again.segment_map, samples[index].segment_map)
        assert again.segments == samples[index].segments and again.caption == samples[index].caption
    assert not np.array_equal(SynthWorld(seed=12).sample(3).image, samples[3].image)
    assert not np.array_equal(fresh.sample(3, stream="val").image, samples[3].image)
    assert not np.array_equal(fresh.sample(3, stream="pretrain").image, samples[3].image)
    with pytest.raises(ValueError, match="stream"):
        fresh.sample(0, stream="test")


def test_sample_types_and_annotations(samples):
    for sample in samples[:40]:
        assert sample.image.shape == (128, 128, 3) and sample.image.dtype == np.uint8
        assert sample.segment_map.shape == (128, 128) and sample.segment_map.dtype == np.int32
        _check_segments(sample.segment_map, sample.segments)
        semantic = sample.semantic_map()
        assert semantic.dtype == np.uint8
        np.testing.assert_array_equal(semantic == IGNORE_LABEL, sample.segment_map == 0)
        for seg in sample.segments:
            assert np.all(semantic[sample.segment_map == seg["id"]] == seg["category_id"])


def test_non_square_world():
    sample = SynthWorld(seed=2, image_size=(48, 96)).sample(0)
    assert sample.image.shape == (48, 96, 3) and sample.segment_map.shape == (48, 96)
    _check_segments(sample.segment_map, sample.segments)
    with pytest.raises(ValueError, match="image sides"):
        SynthWorld(seed=2, image_size=(8, 96))


def test_every_class_appears_and_things_are_long_tailed(samples):
    instances = Counter(s["category_id"] for sample in samples for s in sample.segments)
    assert set(instances) == {c.id for c in CLASSES}
    thing_counts = [instances[c.id] for c in THING_CLASSES]
    assert max(thing_counts) >= 4 * min(thing_counts)


def test_scenes_have_void_crowds_occlusion_and_small_things(samples):
    assert sum((s.segment_map == 0).any() for s in samples) >= 40
    assert sum(seg["iscrowd"] for s in samples for seg in s.segments) >= 5
    thing_areas = [seg["area"] for s in samples for seg in s.segments
                   if CLASSES[seg["category_id"]].isthing and not seg["iscrowd"]]
    assert min(thing_areas) < 40 and max(thing_areas) > 800
    assert sum(len(s.segments) >= 6 for s in samples) >= 50
    # Occlusion: some thing is visible on less pixels than its box would hold as a full square.
    assert any(seg["area"] < 0.3 * seg["bbox"][2] * seg["bbox"][3] for s in samples for seg in s.segments
               if CLASSES[seg["category_id"]].kind == "square")


def test_captions_name_exactly_the_classes_present(samples):
    for sample in samples[:60]:
        present = sample.category_ids
        for cls in CLASSES:
            mentioned = cls.name in sample.caption or plural(cls.name) in sample.caption
            assert mentioned == (cls.id in present), (cls.name, sample.caption)


def test_caption_wording():
    assert plural("orange cross") == "orange crosses" and plural("red circle") == "red circles"
    segs = [{"category_id": 0, "iscrowd": 0}, {"category_id": 0, "iscrowd": 0},
            {"category_id": 7, "iscrowd": 0}, {"category_id": 3, "iscrowd": 1},
            {"category_id": 15, "iscrowd": 0}, {"category_id": 14, "iscrowd": 0}]
    assert make_caption(segs, [14, 15]) == ("two red circles, an orange cross and a crowd of yellow stars "
                                            "on grass under sky")


@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_are_centred_and_sized(shape):
    mask = shape_mask(shape, (64, 64), 32.0, 32.0, 12.0)
    ys, xs = np.nonzero(mask)
    assert 20 <= mask.sum() <= 600
    assert abs(ys.mean() - 32) < 4 and abs(xs.mean() - 32) < 4
    assert ys.max() - ys.min() <= 32 and not mask[0].any() and not mask[:, 0].any()


def _stems(path: Path) -> list[str]:
    return [Path(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()]


def test_written_panoptic_pngs_match_json(dataset):
    for split, count in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        data = json.loads((dataset / f"annotations/panoptic_{split}.json").read_text())
        assert len(data["images"]) == len(data["annotations"]) == count
        assert [c["id"] for c in data["categories"]] == [c.id for c in CLASSES]
        for image, ann in zip(data["images"], data["annotations"]):
            assert image["id"] == ann["image_id"] and (image["height"], image["width"]) == SIZE
            rgb = np.asarray(Image.open(dataset / f"images/{split}" / image["file_name"]))
            assert rgb.shape == SIZE + (3,)
            ids = rgb2id(np.asarray(Image.open(dataset / f"annotations/panoptic_{split}" / ann["file_name"])))
            _check_segments(ids, ann["segments_info"])
            semantic = np.asarray(Image.open(dataset / f"annotations/semantic_{split}" / ann["file_name"]))
            assert semantic.dtype == np.uint8 and semantic.ndim == 2
            lut = np.full(int(ids.max()) + 1, IGNORE_LABEL)
            for seg in ann["segments_info"]:
                lut[seg["id"]] = seg["category_id"]
            np.testing.assert_array_equal(semantic, lut[ids])
    classes = json.loads((dataset / "classes.json").read_text())
    assert [c["name"].split(",")[0] for c in classes] == [c.name for c in CLASSES]


def test_partitions_are_nested_and_disjoint_from_val(dataset):
    train = {Path(p).stem for p in (dataset / "images/train").iterdir()}
    val = _stems(dataset / "partitions/val.txt")
    assert sorted(val) == sorted(Path(p).stem for p in (dataset / "images/val").iterdir())
    lists = {name: _stems(dataset / "partitions" / name / "labeled.txt") for name in PARTITION_FRACTIONS}
    for name, denominator in PARTITION_FRACTIONS.items():
        assert len(lists[name]) == math.ceil(NUM_TRAIN / denominator) == len(set(lists[name]))
        assert set(lists[name]) <= train and not set(lists[name]) & set(val)
    assert lists["1_8"][: len(lists["1_16"])] == lists["1_16"]
    assert lists["1_4"][: len(lists["1_8"])] == lists["1_8"]
    first = (dataset / "partitions/1_4/labeled.txt").read_text().splitlines()[0].split()
    assert all((dataset / p).is_file() for p in first)


def test_writer_output_is_byte_identical_per_seed(dataset, tmp_path):
    again = write_synth_dataset(tmp_path / "again", NUM_TRAIN, seed=5, num_val=NUM_VAL, image_size=SIZE)
    other = write_synth_dataset(tmp_path / "other", NUM_TRAIN, seed=6, num_val=NUM_VAL, image_size=SIZE)
    files = ["dataset.yaml", "classes.json", "annotations/panoptic_train.json", "annotations/panoptic_val.json",
             "images/train/train_000003.png", "annotations/panoptic_val/val_000001.png",
             "annotations/semantic_train/train_000010.png", "partitions/1_4/labeled.txt"]
    for rel in files:
        assert (again / rel).read_bytes() == (dataset / rel).read_bytes(), rel
    for rel in files[2:5] + files[-1:]:
        assert (other / rel).read_bytes() != (dataset / rel).read_bytes(), rel


def test_cli_refuses_non_empty_dir_and_overwrites_its_own(tmp_path, capsys):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["synth", "--out", str(out), "--num-images", "3", "--val-images", "2", "--size", "48"]
    assert main(args) == 1
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main(args + ["--overwrite"]) == 0
    assert "3 train + 2 val" in capsys.readouterr().out
    assert (out / "notes.txt").read_text() == "mine" and len(list((out / "images/train").iterdir())) == 3
    assert main(args[:4] + ["2", "--size", "48", "--overwrite"]) == 0  # fewer images: no stale files remain
    assert len(list((out / "images/train").iterdir())) == 2


def test_overwrite_never_replaces_foreign_dataset(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "photo.jpg").write_bytes(b"not ours")
    with pytest.raises(DataError, match="not written by"):
        write_synth_dataset(tmp_path, 2, seed=0, num_val=1, image_size=(32, 32), overwrite=True)
    assert (tmp_path / "images" / "photo.jpg").read_bytes() == b"not ours"


def test_reader_loads_written_dataset(dataset):
    dataset_module = pytest.importorskip("dearli.data.dataset", reason="dataset reader not available")
    info = dataset_module.load_dataset(dataset)
    assert info.categories.names == [c.name for c in CLASSES]
    assert set(info.categories.thing_ids) == {c.id for c in THING_CLASSES}
    assert set(info.partition_names()) == set(PARTITION_FRACTIONS)
    assert list(info.partition("1_16").labeled) == _stems(dataset / "partitions/1_16/labeled.txt")
    split = info.split("train")
    assert len(split.records) == NUM_TRAIN
    world = SynthWorld(seed=5, image_size=SIZE)
    for record in split.records[:4]:
        sample = world.sample(int(record.stem.split("_")[1]))
        np.testing.assert_array_equal(split.load_image(record), sample.image)
        target = split.load_target(record)
        np.testing.assert_array_equal(target.segment_map, sample.segment_map)
        assert list(target.labels) == [s["category_id"] for s in sample.segments]
        assert list(target.iscrowd) == [bool(s["iscrowd"]) for s in sample.segments]
