"""COCO panoptic reading: categories, records, targets, dataset.yaml, layout detection, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from _panoptic_factory import DEFAULT_CATEGORIES, random_image, small_dataset, write_dataset, write_split
from PIL import Image

from dearli.cli import main
from dearli.data.classes import coco_objects_categories, load_class_names, read_classes_json
from dearli.data.coco_format import id2rgb
from dearli.data.dataset import load_dataset
from dearli.data.panoptic import Category, CategoryMap, parse_synonyms
from dearli.data.panoptic_records import PanopticRecord, RecordTable, SegmentInfo
from dearli.errors import DataError


def _cats(*triples):
    return CategoryMap([Category(i, n, t, parse_synonyms(n)) for i, n, t in triples])


def test_category_map_round_trip_with_zero_and_gaps():
    cats = _cats((92, "sky", False), (0, "wall", False), (3, "person", True), (17, "car", True))
    assert cats.dataset_ids == (0, 3, 17, 92)  # training ids follow sorted dataset ids
    for contiguous, dataset_id in enumerate((0, 3, 17, 92)):
        assert cats.to_contiguous(dataset_id) == contiguous
        assert cats.to_dataset_id(contiguous) == dataset_id
    assert cats.thing_ids == (1, 2) and cats.stuff_ids == (0, 3)
    assert cats.num_classes == 4 and cats.names == ["wall", "person", "car", "sky"]
    with pytest.raises(KeyError):
        cats.to_contiguous(5)
    with pytest.raises(IndexError):
        cats.to_dataset_id(4)


def test_synonyms_and_duplicate_ids():
    cat = Category.from_dict({"id": 1, "name": "person, child ,girl", "isthing": 1}, "x.json")
    assert cat.name == "person" and cat.synonyms == ("person", "child", "girl") and cat.isthing
    assert Category.from_dict(cat.to_dict(), "x.json") == cat
    with pytest.raises(DataError, match="defined twice"):
        _cats((1, "a", True), (1, "b", False))
    with pytest.raises(DataError, match="x.json"):
        Category.from_dict({"id": "7", "name": "a"}, "x.json")


def test_standard_class_sets():
    ade = load_class_names("ade20k_150")
    assert [c.id for c in ade] == list(range(150))
    assert sum(c.isthing for c in ade) == 100
    assert ade[0].name == "wall" and ade[12].name == "person" and ade[12].isthing
    assert ade[1].synonyms == ("building",) and not ade[1].isthing
    assert ade[8].name == "window"  # the reference spells it with a trailing blank
    assert ade[6].synonyms == ("road", "route")
    coco = load_class_names("coco_133")
    assert len(coco) == 133 and sum(c.isthing for c in coco) == 80
    assert coco[0].id == 1 and coco[0].name == "person" and coco[-1].id == 200
    assert max(c.id for c in coco if c.isthing) == 90 and min(c.id for c in coco if not c.isthing) == 92
    objects = coco_objects_categories()
    assert len(objects) == 81 and objects[0].id == 0 and objects[0].name == "background"
    assert not objects[0].isthing and all(c.isthing for c in objects[1:])
    with pytest.raises(DataError, match="unknown class set"):
        load_class_names("voc")


def test_split_records_and_targets(tmp_path):
    root = small_dataset(tmp_path / "ds")
    info = load_dataset(root)
    assert info.name == "fake" and info.split_names == ["train", "val"]
    cats = info.categories
    assert cats.dataset_ids == (0, 3, 17, 92) and cats.synonyms[1] == ("person", "child", "girl")
    split = info.split("train")
    assert info.split("train") is split  # parsed once
    rec = split.record("train_002")
    assert rec.image_id == "train_002"  # string image ids survive
    assert rec.image_path == root / "images/train/train_002.jpg"
    image = split.load_image(rec)
    assert image.shape == (rec.height, rec.width, 3) and image.dtype == np.uint8 and image.flags.writeable
    target = split.load_target(rec)
    png = np.asarray(Image.open(rec.panoptic_path)).astype(np.int64)
    assert np.array_equal(target.segment_map, png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2])
    expected = {s.id: (cats.to_contiguous(s.category_id), s.iscrowd) for s in rec.segments_info}
    assert set(target.segment_ids.tolist()) == set(expected)
    for k, seg_id in enumerate(target.segment_ids.tolist()):
        assert (target.labels[k], target.iscrowd[k]) == expected[seg_id]
        assert np.array_equal(target.masks[k], target.segment_map == seg_id)
    assert target.iscrowd.sum() == 1 and target.labels.dtype == np.int64
    assert (target.segment_map[-1] == 0).all()  # VOID row belongs to no mask
    assert not target.masks[:, -1].any()
    semantic = split.load_semantic(rec)
    assert (semantic[-1] == 255).all()
    crowd_label = target.labels[target.iscrowd][0]
    assert (semantic[target.masks[target.iscrowd][0]] == crowd_label).all()


def test_integer_image_ids_and_subset(tmp_path):
    rng = np.random.default_rng(1)
    images = [random_image(f"{i:012d}", rng, image_id=i) for i in (139, 285, 632)]
    info = load_dataset(write_dataset(tmp_path / "ds", {"train": images}))
    split = info.split("train")
    assert [r.image_id for r in split.records] == [139, 285, 632]
    sub = split.subset(["000000000632", "000000000139"])
    assert [r.image_id for r in sub.records] == [632, 139]
    assert [r.stem for r in split.exclude(["000000000285"])] == ["000000000139", "000000000632"]
    with pytest.raises(DataError, match="000000000001"):
        split.subset(["000000000001"])


def _record(k, segments):
    """Record ``k``: odd ones have integer ids, record 2 has no annotation."""
    image = Path(f"/data/images/sub dir/img_{k}.jpg")
    return PanopticRecord(image_id=k if k % 2 else f"id-{k}", stem=f"img_{k}", image_path=image,
                          panoptic_path=None if k == 2 else image.with_suffix(".png"), height=10 + k, width=20 + k,
                          segments_info=segments, semantic_path=None if k == 2 else image.with_name(f"sem_{k}.png"))


def test_a_record_table_gives_back_every_field_of_the_records_it_keeps():
    seg = [SegmentInfo(id=k + 1, category_id=92 - k, label=k % 4, iscrowd=k == 3, area=1000 * k + 7,
                       bbox=(0.5 * k, 1.25, 3.0 + k, 1e-7 * k)) for k in range(6)]
    records = [_record(0, tuple(seg[:3])), _record(1, ()), _record(2, (seg[3],)), _record(3, tuple(seg[4:]))]
    table = RecordTable.from_records(records)
    assert len(table) == 4 and list(table) == records and table.stems == [r.stem for r in records]
    assert table[-1] == records[3] and table[1:3] == records[1:3]
    assert all(type(v) is int for s in table[0].segments_info for v in (s.id, s.category_id, s.label, s.area))
    assert table[2].segments_info[0].iscrowd is True and table[2].panoptic_path is None
    assert list(table.take([3, 0, 3])) == [records[3], records[0], records[3]]
    assert list(table.take([-1])) == [records[3]]
    with pytest.raises(IndexError):
        table.take([4])
    with pytest.raises(IndexError):
        table[4]
    with pytest.raises(IndexError):
        table[-5]


def test_a_split_keeps_its_records_in_columns_through_subset_and_exclude(tmp_path):
    split = load_dataset(small_dataset(tmp_path / "ds", n_train=5, n_val=1)).split("train")
    assert isinstance(split.records, RecordTable)
    records = list(split)
    sub = split.subset(["train_003", "train_000"])
    assert isinstance(sub.records, RecordTable) and list(sub) == [records[3], records[0]]
    assert sub.record("train_000") == records[0] and not sub.has("train_001")
    rest = split.exclude(["train_001", "train_004"])
    assert list(rest) == [records[0], records[2], records[3]]
    assert rest.load_target(rest.record("train_002")).segment_ids.tolist() == [
        s.id for s in records[2].segments_info]


@pytest.fixture
def dataset(tmp_path):
    return small_dataset(tmp_path / "ds", n_train=3, n_val=1)


def _train_record(root):
    split = load_dataset(root).split("train")
    return split, split.record("train_001")


def test_unreadable_and_truncated_images(dataset):
    split, rec = _train_record(dataset)
    rec.image_path.write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match="train_001.jpg") as err:
        split.load_image(rec)
    assert err.value.path == str(rec.image_path)
    other = split.record("train_002")
    data = other.image_path.read_bytes()
    other.image_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="train_002.jpg.*cannot read"):
        split.load_image(other)
    rec.image_path.unlink()
    with pytest.raises(DataError, match="not found"):
        split.load_image(rec)


def test_png_segment_missing_from_json(dataset):
    split, rec = _train_record(dataset)
    seg = split.load_target(rec).segment_map
    seg[0, 0] = 77
    Image.fromarray(id2rgb(seg)).save(rec.panoptic_path)
    with pytest.raises(DataError, match=r"train_001.png.*\[77\].*not in the segments_info"):
        split.load_target(rec)


def test_json_segment_missing_from_png(dataset):
    path = dataset / "annotations/panoptic_train.json"
    data = json.loads(path.read_text())
    data["annotations"][1]["segments_info"].append({"id": 99, "category_id": 3, "iscrowd": 0, "area": 1})
    path.write_text(json.dumps(data))
    split, rec = _train_record(dataset)
    with pytest.raises(DataError, match=r"train_001.png.*\[99\].*no pixel"):
        split.load_target(rec)


def test_unknown_category_id(dataset):
    path = dataset / "annotations/panoptic_train.json"
    data = json.loads(path.read_text())
    data["annotations"][2]["segments_info"][0]["category_id"] = 55
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"panoptic_train.json.*train_002.*unknown category id 55"):
        load_dataset(dataset).split("train")
    problems = []
    split = load_dataset(dataset).split("train", problems=problems)
    assert len(problems) == 1 and split.stems == ["train_000", "train_001"]


def test_size_mismatch(dataset):
    split, rec = _train_record(dataset)
    Image.new("RGB", (rec.width + 2, rec.height)).save(rec.image_path)
    with pytest.raises(DataError, match=r"train_001.jpg: image is 34x24"):
        split.load_image(rec)
    Image.new("RGB", (rec.width, rec.height + 1)).save(rec.panoptic_path)
    with pytest.raises(DataError, match="train_001.png: panoptic PNG is 32x25"):
        split.load_target(rec)


def _edit_yaml(root, change):
    doc = yaml.safe_load((root / "dataset.yaml").read_text())
    change(doc)
    (root / "dataset.yaml").write_text(yaml.safe_dump(doc))


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("splits"), "'splits'"),
    (lambda d: d["splits"]["val"].pop("panoptic_dir"), "splits.val.panoptic_dir"),
    (lambda d: d["splits"]["val"].update(image_dir=3), "splits.val.image_dir' must be a non-empty string"),
    (lambda d: d["splits"]["train"].update(panoptic_json="nope.json"), "splits.train.panoptic_json.*nope"),
    (lambda d: d["splits"]["train"].update(pan_dir="x"), "unknown field.*splits.train.pan_dir"),
    (lambda d: d.update(classes="classes.json"), "'classes'.*does not exist"),
    (lambda d: d.update(partitions="parts"), "'partitions'.*does not exist"),
])
def test_dataset_yaml_errors(dataset, change, message):
    _edit_yaml(dataset, change)
    with pytest.raises(DataError, match=message) as err:
        load_dataset(dataset)
    assert err.value.path.endswith("dataset.yaml")


def test_classes_json_overrides_names(dataset):
    rows = [dict(c, name=c["name"] + ",extra") for c in DEFAULT_CATEGORIES]
    (dataset / "classes.json").write_text(json.dumps(rows))
    _edit_yaml(dataset, lambda d: d.update(classes="classes.json"))
    info = load_dataset(dataset)
    assert info.categories.synonyms[0] == ("wall", "extra")
    assert len(read_classes_json(dataset / "classes.json")) == 4
    rows[1]["isthing"] = 0  # now disagrees with the panoptic JSON
    (dataset / "classes.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match="panoptic_train.json.*category 3"):
        load_dataset(dataset).split("train")


def test_coco_layout_detection(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "coco"
    for split in ("train", "val"):
        write_split(root, split, [random_image(f"{split}_0", rng, image_id=7)], DEFAULT_CATEGORIES)
        (root / "images" / split).rename(root / f"{split}2017")
        (root / f"annotations/panoptic_{split}.json").rename(root / f"annotations/panoptic_{split}2017.json")
        (root / f"annotations/panoptic_{split}").rename(root / f"panoptic_{split}2017")
        shutil.rmtree(root / f"annotations/semantic_{split}")
    info = load_dataset(root)
    assert info.name == "coco" and info.split_names == ["train", "val"]
    split = info.split("val")
    assert split.load_target(split.record("val_0")).segment_ids.size > 0
    with pytest.raises(DataError, match="dataset.yaml: not found"):
        load_dataset(tmp_path)


def test_cli_check(dataset, capsys):
    assert main(["data", "check", str(dataset), "--no-progress"]) == 0
    assert "4 images checked, 0 problem(s) in total" in capsys.readouterr().out
    split, rec = _train_record(dataset)
    rec.image_path.write_bytes(b"junk")
    seg = split.load_target(split.record("train_002")).segment_map
    seg[0, 0] = 77
    Image.fromarray(id2rgb(seg)).save(split.record("train_002").panoptic_path)
    assert main(["data", "check", str(dataset), "--split", "train", "--no-progress"]) == 1
    out = capsys.readouterr().out
    bad = [line for line in out.splitlines() if line.startswith("BAD")]
    assert len(bad) == 2
    assert "train_001.jpg" in bad[0] and "train_002.png" in bad[1]
    assert "split 'train': 3 images checked, 2 problem(s)" in out


def _drop_annotation(root, split_name, stem):
    """The image stays in the split's JSON, its annotation and PNGs go (an image of COCO's unlabeled pool)."""
    path = root / "annotations" / f"panoptic_{split_name}.json"
    data = json.loads(path.read_text())
    image_id = next(i["id"] for i in data["images"] if i["file_name"].startswith(stem))
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != image_id]
    path.write_text(json.dumps(data))
    for folder in ("panoptic", "semantic"):
        (root / "annotations" / f"{folder}_{split_name}" / f"{stem}.png").unlink()


def test_cli_check_counts_the_unlabeled_pool_apart_from_problems(dataset, capsys):
    _drop_annotation(dataset, "train", "train_002")
    assert main(["data", "check", str(dataset), "--split", "train", "--no-progress"]) == 0
    assert "split 'train': 3 images checked, 1 without annotation (the unlabeled pool), 0 problem(s)" in \
        capsys.readouterr().out
    (dataset / "images" / "train" / "train_002.jpg").write_bytes(b"junk")  # its image is still read
    assert main(["data", "check", str(dataset), "--split", "train", "--no-progress"]) == 1
    assert "train_002.jpg" in capsys.readouterr().out
    _drop_annotation(dataset, "val", "val_000")  # a val image without annotation cannot be scored: a problem
    assert main(["data", "check", str(dataset), "--split", "val", "--no-progress"]) == 1
    assert "has no panoptic annotation" in capsys.readouterr().out
