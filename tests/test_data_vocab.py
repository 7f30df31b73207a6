"""Shipped class vocabularies (the official prompt-engineered synonym lists): coverage, format, licence, use."""

from __future__ import annotations

import fnmatch
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import yaml
from _panoptic_factory import random_image, write_dataset, write_split

from dearli.data.classes import (
    VOCABULARIES,
    apply_vocabulary,
    load_class_names,
    load_vocabulary,
    parse_vocabulary,
    vocabulary_matches,
)
from dearli.data.dataset import load_dataset
from dearli.data.panoptic import CategoryMap
from dearli.errors import DataError

REPO = Path(__file__).resolve().parents[1]
SHARED_VOCAB = REPO.parent / "shared" / "data" / "vocab"  # reference copies, when present beside the checkout
SHARED_NAMES = {"ade20k_150": "ade20k_150_prompts.txt", "coco_panoptic": "coco_panoptic_prompts.txt",
                "coco_objects": "coco_objects_prompts.txt"}
CLASS_SETS = {"ade20k_150": "ade20k_150", "coco_panoptic": "coco_133", "coco_objects": "coco_objects_81"}


def _vocab_dir():
    return resources.files("dearli.data").joinpath("classes", "vocab")


@pytest.mark.parametrize("name", sorted(VOCABULARIES))
def test_every_category_id_has_an_entry(name):
    vocabulary = load_vocabulary(name)
    dataset_ids = {c.id for c in load_class_names(CLASS_SETS[name])}
    assert set(vocabulary) == dataset_ids  # every id named, nothing else
    assert len(dataset_ids) == {"ade20k_150": 150, "coco_panoptic": 133, "coco_objects": 81}[name]
    assert all(synonyms and all(s.strip() == s and s for s in synonyms) for synonyms in vocabulary.values())


def test_known_entries():
    ade, coco, objects = (load_vocabulary(n) for n in ("ade20k_150", "coco_panoptic", "coco_objects"))
    assert ade[0] == ("wall", "walls", "brick wall", "stone wall", "interior wall")  # line 1 is category 0
    assert ade[149][0] == "flag" and ade[12][0] == "person"
    assert coco[199] == ("wall", "walls")  # wall-other-merged
    assert "tennis court" in coco[145] and coco[1][0] == "person"  # playingfield
    assert objects[0] == ("background",) and objects[1] == coco[1]
    # Every class's benchmark name or its first synonym is among the vocabulary's words for that id.
    for name, vocab in (("ade20k_150", ade), ("coco_objects", objects)):
        matches = sum(bool(set(c.synonyms) & set(vocab[c.id])) for c in load_class_names(CLASS_SETS[name]))
        assert matches >= 0.9 * len(vocab)


@pytest.mark.parametrize("name", sorted(VOCABULARIES))
def test_shipped_copies_equal_the_reference_lists(name):
    reference = SHARED_VOCAB / SHARED_NAMES[name]
    if not reference.is_file():
        pytest.skip("no reference copy of the upstream vocabularies beside the checkout")
    shipped = _vocab_dir().joinpath(VOCABULARIES[name][0]).read_text(encoding="utf-8")
    assert shipped == reference.read_text(encoding="utf-8")


def test_licence_notice_is_shipped_and_packaged():
    notice = _vocab_dir().joinpath("NOTICE.md").read_text(encoding="utf-8")
    for text in ("MIT License", "Copyright (c) 2025 Ivan Martinović", "Apache License, Version 2.0",
                 "Bytedance", "Permission is hereby granted"):
        assert text in notice
    for file_name, _, _ in VOCABULARIES.values():
        assert f"`{file_name}`" in notice
    section = (REPO / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")[1].split("\n[")[0]
    patterns = re.findall(r'"([^"]+)"', section)
    shipped = [f"data/classes/vocab/{p.name}" for p in _vocab_dir().iterdir() if not p.name.startswith(".")]
    assert len(shipped) == len(VOCABULARIES) + 1
    for path in shipped:  # a wheel carries every file of the directory
        assert any(fnmatch.fnmatch(path, pattern) for pattern in patterns), path


def test_parse_vocabulary_format_and_errors():
    text = "0:invalid_class_id\n1:wall,walls, brick wall\n\n3:sky"  # no final newline, blank line
    assert parse_vocabulary(text, "v.txt", offset=1) == {0: ("wall", "walls", "brick wall"), 2: ("sky",)}
    with pytest.raises(DataError, match="v.txt: line 2: expected 'ID:name"):
        parse_vocabulary("1:wall\nsky\n", "v.txt")
    with pytest.raises(DataError, match="v.txt: line 2: id 1 is listed twice"):
        parse_vocabulary("1:wall\n1:sky\n", "v.txt")
    with pytest.raises(DataError, match="unknown vocabulary 'nope'"):
        load_vocabulary("nope")


def _coco_categories(ids):
    by_id = {c.id: c for c in load_class_names("coco_133")}
    return [{"id": i, "name": by_id[i].name, "isthing": int(by_id[i].isthing)} for i in ids]


def _dataset(root, categories, **yaml_fields):
    rng = np.random.default_rng(0)
    splits = {s: [random_image(f"{s}_{i}", rng, categories=categories) for i in range(2)] for s in ("train", "val")}
    write_dataset(root, splits, categories)
    doc = yaml.safe_load((root / "dataset.yaml").read_text())
    (root / "dataset.yaml").write_text(yaml.safe_dump({**doc, **yaml_fields}, sort_keys=False))
    return root


def test_dataset_yaml_vocabulary_names_the_classes_and_classes_json_overrides_it(tmp_path):
    categories = _coco_categories([1, 3, 92, 199])
    info = load_dataset(_dataset(tmp_path / "a", categories, vocabulary="coco_panoptic"))
    coco = load_vocabulary("coco_panoptic")
    assert info.categories.synonyms == [coco[1], coco[3], coco[92], coco[199]]
    assert info.categories.names == ["person", "car", "banner", "wall-other-merged"]  # display names stay
    assert info.split("val").categories.synonyms == info.categories.synonyms  # every split, any order
    # A user's classes.json wins over the vocabulary.
    root = _dataset(tmp_path / "b", categories, vocabulary="coco_panoptic", classes="classes.json")
    (root / "classes.json").write_text(
        '[{"id": 1, "name": "human,pedestrian", "isthing": 1}, {"id": 3, "name": "auto", "isthing": 1},'
        ' {"id": 92, "name": "flag", "isthing": 0}, {"id": 199, "name": "partition", "isthing": 0}]')
    assert load_dataset(root).categories.synonyms == [("human", "pedestrian"), ("auto",), ("flag",), ("partition",)]


def test_dataset_yaml_vocabulary_errors(tmp_path):
    root = _dataset(tmp_path / "a", _coco_categories([1, 3, 92]), vocabulary="coco_stuff")
    with pytest.raises(DataError, match="dataset.yaml: field 'vocabulary': unknown vocabulary 'coco_stuff'"):
        load_dataset(root)
    categories = _coco_categories([1, 3, 92]) + [{"id": 250, "name": "tumour", "isthing": 1}]
    root = _dataset(tmp_path / "b", categories, vocabulary="coco_panoptic")
    with pytest.raises(DataError, match=r"dataset.yaml: category 250 \('tumour'\) has no entry"):
        _ = load_dataset(root).categories


def test_vocabulary_matches_only_the_benchmarks_classes():
    coco = CategoryMap(load_class_names("coco_133"))
    assert vocabulary_matches(coco, "coco_panoptic")
    ade = CategoryMap(load_class_names("ade20k_150"))
    assert vocabulary_matches(ade, "ade20k_150") and not vocabulary_matches(ade, "coco_panoptic")
    renamed = apply_vocabulary(coco, "coco_panoptic", "x")
    assert vocabulary_matches(renamed, "coco_panoptic")  # display names survive the renaming
    custom = CategoryMap(load_class_names("coco_133")[:3])
    custom = CategoryMap([type(c)(c.id, "tumour", c.isthing, ("tumour",), c.color) for c in custom.categories])
    assert not vocabulary_matches(custom, "coco_panoptic")


def _coco_layout(root, categories):
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        write_split(root, split, [random_image(f"{split}_0", rng, image_id=7, categories=categories)], categories,
                    semantic=False)
        (root / "images" / split).rename(root / f"{split}2017")
        (root / f"annotations/panoptic_{split}.json").rename(root / f"annotations/panoptic_{split}2017.json")
        (root / f"annotations/panoptic_{split}").rename(root / f"panoptic_{split}2017")
    return root


def test_detected_coco_layout_uses_the_vocabulary_only_for_cocos_classes(tmp_path):
    coco = _coco_layout(tmp_path / "coco", _coco_categories([1, 3, 92, 199]))
    assert load_dataset(coco).categories.synonyms[3] == ("wall", "walls")
    # Another dataset stored in COCO's layout keeps its own names (id 3 is not a car here).
    custom = [{"id": 1, "name": "cell", "isthing": 1}, {"id": 3, "name": "nucleus", "isthing": 1},
              {"id": 92, "name": "tissue", "isthing": 0}]
    assert load_dataset(_coco_layout(tmp_path / "custom", custom)).categories.synonyms == [
        ("cell",), ("nucleus",), ("tissue",)]
    # A classes.json beside the layout names the classes instead.
    (coco / "classes.json").write_text(
        '[{"id": 1, "name": "human", "isthing": 1}, {"id": 3, "name": "auto", "isthing": 1},'
        ' {"id": 92, "name": "flag", "isthing": 0}, {"id": 199, "name": "partition", "isthing": 0}]')
    assert load_dataset(coco).categories.synonyms == [("human",), ("auto",), ("flag",), ("partition",)]
