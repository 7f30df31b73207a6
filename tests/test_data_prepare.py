"""Dataset preparation: ADE20K -> COCO panoptic (Mask2Former rules) and COCO panoptic -> COCO-Objects."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml
from _panoptic_factory import random_image, write_partition, write_split
from PIL import Image

from dearli.cli import main
from dearli.data.classes import ade20k_instance_to_category, load_vocabulary
from dearli.data.dataset import load_dataset
from dearli.data.prepare_ade20k import prepare_ade20k
from dearli.data.prepare_coco_objects import prepare_coco_objects
from dearli.errors import DataError

# SceneParsing labels (1-based) and instance-challenge classes used below.
WALL, SKY, FLOOR, BED, PERSON = 1, 3, 4, 8, 13  # category ids 0, 2, 3, 7, 12
INST_BED, INST_PERSON = 1, 4


def _ade_image(kind: str):
    """Semantic (H×W) and instance (H×W×3) annotations of a 10×12 scene."""
    sem = np.zeros((10, 12), np.uint8)
    sem[:5] = WALL
    sem[5:] = FLOOR
    sem[0, 0] = 0  # unlabeled
    ins = np.zeros((10, 12, 3), np.uint8)
    # person instance 1: overlaps wall pixels of the semantic map -> painted over the wall
    sem[3:7, 1:4] = PERSON
    ins[2:7, 1:4] = (INST_PERSON, 1, 0)
    # person-class pixels that no instance covers -> VOID
    sem[8:10, 9:12] = PERSON
    # bed instance 2, and a small sky patch fully hidden under it
    sem[6:9, 5:8] = BED
    sem[7, 6] = SKY
    ins[6:9, 5:8] = (INST_BED, 2, 0)
    if kind == "val":
        ins[:] = 0
        sem[sem == PERSON] = WALL
    return sem, ins


@pytest.fixture
def ade_root(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    for split, folder in (("train", "training"), ("val", "validation")):
        for sub in ("images", "annotations", "annotations_instance"):
            (root / sub / folder).mkdir(parents=True)
        stem = f"ADE_{split}_00000001"
        sem, ins = _ade_image(split)
        Image.fromarray(np.full((10, 12, 3), 128, np.uint8)).save(root / "images" / folder / f"{stem}.jpg")
        Image.fromarray(sem, mode="L").save(root / "annotations" / folder / f"{stem}.png")
        Image.fromarray(ins, mode="RGB").save(root / "annotations_instance" / folder / f"{stem}.png")
    return root


def test_instance_class_table():
    table = ade20k_instance_to_category()
    assert len(table) == 100 and table[INST_BED] == BED - 1 and table[INST_PERSON] == PERSON - 1
    assert table[100] == 149 and len(set(table.values())) == 100


def test_prepare_ade20k(ade_root, tmp_path):
    write_partition(tmp_path / "splits", "1_8", ["ADE_train_00000001"], image_dir="images/training")
    out = prepare_ade20k(ade_root, tmp_path / "out", partitions=tmp_path / "splits" / "partitions",
                         progress=False)
    data = json.loads((out / "ade20k_panoptic_train.json").read_text())
    assert [c["id"] for c in data["categories"]] == list(range(150))
    assert sum(c["isthing"] for c in data["categories"]) == 100
    assert data["images"][0] == {"id": "ADE_train_00000001", "file_name": "ADE_train_00000001.jpg",
                                 "height": 10, "width": 12}
    segs = data["annotations"][0]["segments_info"]
    # stuff first (one per class, sky dropped: fully covered), then the instances in id order
    assert [(s["id"], s["category_id"]) for s in segs] == [(1, 0), (3, 3), (4, 12), (5, 7)]
    sem, _ = _ade_image("train")
    # areas are measured before things paint over stuff (reference rule)
    assert segs[0]["area"] == int((sem == WALL).sum()) and segs[0]["bbox"] == [0, 0, 12, 5]
    assert segs[2]["area"] == 15 and segs[2]["bbox"] == [1, 2, 3, 5]

    info = load_dataset(out)
    # The classes are named by the official ADE20K-150 vocabulary; the JSON keeps the benchmark's names.
    assert yaml.safe_load((out / "dataset.yaml").read_text())["vocabulary"] == "ade20k_150"
    assert info.categories.synonyms[0] == ("wall", "walls", "brick wall", "stone wall", "interior wall")
    assert info.categories.synonyms == [load_vocabulary("ade20k_150")[k] for k in range(150)]
    assert data["categories"][0]["name"] == "wall" and info.categories.names[0] == "wall"
    split = info.split("train")
    rec = split.record("ADE_train_00000001")
    assert rec.image_id == "ADE_train_00000001"
    target = split.load_target(rec)  # PNG and JSON agree
    seg_map = target.segment_map
    assert (seg_map[2:7, 1:4] == 4).all()  # the instance wins over the wall
    assert (seg_map[8:10, 9:12] == 0).all()  # thing pixels without an instance stay VOID
    assert seg_map[0, 0] == 0 and seg_map[7, 6] == 5
    assert info.categories.to_contiguous(12) == 12  # ids 0-149 are their own training ids
    semantic = split.load_semantic(rec)
    assert semantic[0, 0] == 255 and semantic[9, 11] == PERSON - 1 and semantic[7, 6] == SKY - 1
    assert info.partition("1_8").labeled_split(split).stems == ["ADE_train_00000001"]
    val = info.split("val")
    assert [s.category_id for s in val.records[0].segments_info] == [0, 2, 3]  # no instance: bed pixels VOID
    assert val.load_image(val.records[0]).shape == (10, 12, 3)


def test_prepare_ade20k_keeps_a_users_classes_json(ade_root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    names = [{"id": k, "name": f"class {k},thing {k}", "isthing": int(k in (7, 12))} for k in range(150)]
    (out / "classes.json").write_text(json.dumps(names))
    before = (out / "classes.json").read_bytes()
    prepare_ade20k(ade_root, out, progress=False)
    assert (out / "classes.json").read_bytes() == before  # never rewritten
    info = load_dataset(out)
    assert info.classes_file == out / "classes.json"
    assert info.categories.synonyms[3] == ("class 3", "thing 3")  # the user's names win over the vocabulary


def test_prepare_ade20k_refuses_to_overwrite(ade_root, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["data", "prepare-ade20k", str(ade_root), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    first = (out / "ade20k_panoptic_train" / "ADE_train_00000001.png").read_bytes()
    assert main(argv) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--workers", "2"]) == 0  # worker processes give the same result
    assert (out / "ade20k_panoptic_train" / "ADE_train_00000001.png").read_bytes() == first


def test_prepare_ade20k_bad_input(ade_root, tmp_path):
    ins_path = ade_root / "annotations_instance/training/ADE_train_00000001.png"
    ins = np.asarray(Image.open(ins_path)).copy()
    ins[2, 1, 0] = INST_BED  # one instance with two classes
    Image.fromarray(ins).save(ins_path)
    with pytest.raises(DataError, match="ADE_train_00000001.png: instance 1 has class value"):
        prepare_ade20k(ade_root, tmp_path / "a", progress=False)
    ins_path.unlink()
    with pytest.raises(DataError, match="ADE_train_00000001.png: instance annotation .* not found"):
        prepare_ade20k(ade_root, tmp_path / "b", progress=False)
    shutil.rmtree(ade_root / "annotations_instance")
    with pytest.raises(DataError, match="annotations_instance"):
        prepare_ade20k(ade_root, tmp_path / "c", progress=False)


COCO_CATS = [{"id": 1, "name": "person", "isthing": 1}, {"id": 3, "name": "car", "isthing": 1},
             {"id": 92, "name": "banner", "isthing": 0}, {"id": 184, "name": "tree-merged", "isthing": 0}]


@pytest.fixture
def coco_root(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "coco"
    for split, ids in (("train", (9, 25, 30)), ("val", (139,))):
        images = [random_image(f"{i:012d}", rng, image_id=i, categories=COCO_CATS, crowd=True) for i in ids]
        write_split(root, split, images, COCO_CATS, semantic=False)
        (root / "images" / split).rename(root / f"{split}2017")
        (root / f"annotations/panoptic_{split}.json").rename(root / f"annotations/panoptic_{split}2017.json")
        (root / f"annotations/panoptic_{split}").rename(root / f"panoptic_{split}2017")
    write_partition(root, "1_2", ["000000000025"], final_newline=False, image_dir="train2017")
    return root


def test_prepare_coco_objects(coco_root):
    out = prepare_coco_objects(coco_root, progress=False)
    assert out == coco_root / "coco_objects"
    source, info = load_dataset(coco_root), load_dataset(out)
    assert info.name == "coco_objects" and info.partition("1_2").labeled == ("000000000025",)
    cats = info.categories
    assert cats.dataset_ids == (0, 1, 3) and cats.names == ["background", "person", "car"]
    assert cats.thing_ids == (1, 2)
    # COCO's classes: the source is named by the COCO panoptic vocabulary, the output by COCO-Objects'.
    assert source.categories.synonyms[0] == load_vocabulary("coco_panoptic")[1]
    assert yaml.safe_load((out / "dataset.yaml").read_text())["vocabulary"] == "coco_objects"
    assert cats.synonyms == [load_vocabulary("coco_objects")[k] for k in (0, 1, 3)]
    written = json.loads((out / "annotations" / "panoptic_train.json").read_text())["categories"]
    assert [c["name"] for c in written] == ["background", "person", "car"]  # no synonyms in the JSON
    for name in ("train", "val"):
        src_split, split = source.split(name), info.split(name)
        assert [r.image_id for r in split.records] == [r.image_id for r in src_split.records]
        for src_rec, rec in zip(src_split.records, split.records):
            src, tgt = src_split.load_target(src_rec), split.load_target(rec)
            assert (tgt.segment_map > 0).all()  # no VOID left
            things = [s for s in src_rec.segments_info if s.category_id in (1, 3)]
            assert len(rec.segments_info) == len(things) + 1
            background = tgt.masks[tgt.labels == 0]
            assert len(background) == 1
            src_thing_pixels = np.isin(src.segment_map, [s.id for s in things])
            assert np.array_equal(background[0], ~src_thing_pixels)
            for seg in things:  # instances keep their pixels, class and crowd flag
                k = [s.category_id for s in rec.segments_info].index(seg.category_id)
                new = rec.segments_info[k]
                assert new.iscrowd == seg.iscrowd
                assert np.array_equal(tgt.segment_map == new.id, src.segment_map == seg.id)
                assert new.area == int((src.segment_map == seg.id).sum())
            semantic = split.load_semantic(rec)
            assert np.array_equal(semantic, np.choose(tgt.segment_map - 1, [0] + [
                cats.to_contiguous(s.category_id) for s in rec.segments_info[1:]]))
    with pytest.raises(DataError, match="already exists"):
        prepare_coco_objects(coco_root, progress=False)
