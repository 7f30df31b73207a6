"""Label Studio exchange: the brush RLE codec, polygons, export -> import round trips into a dataset that
``dearli train --partition`` reads, every unusable region listed, and nothing of a user's overwritten."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from _label_studio_factory import CHECKPOINT_SHA, annotated_export, drop_annotations, write_pseudo_labels
from _panoptic_factory import DEFAULT_CATEGORIES, FakeImage, random_image, write_dataset

from dearli.annotation import dataset_import
from dearli.annotation.label_studio import class_names, label_config, task_for_image
from dearli.annotation.label_studio_results import PROBLEM_KINDS, Region, annotated_images, latest_annotation, task_stem
from dearli.annotation.panoptic_regions import paint_regions
from dearli.cli import main
from dearli.data.dataset import load_dataset
from dearli.data.label_studio_format import class_lookup
from dearli.data.label_studio_rle import (
    RleError,
    decode_mask,
    encode_mask,
    pack_values,
    unpack_values,
)
from dearli.data.panoptic import CategoryMap
from dearli.data.polygon import mask_polygons, polygon_mask
from dearli.errors import DataError

UNLABELED = ["train_003", "train_004", "train_005"]  # images of the train split without an annotation
PSEUDO = ["train_002", *UNLABELED]  # train_002 has one: the import replaces it


def _bits(text: str) -> list[int]:
    """Bytes of a bit string (spaces ignored), zero-padded at the end."""
    text = text.replace(" ", "")
    text += "0" * (-len(text) % 8)
    return [int(text[i:i + 8], 2) for i in range(0, len(text), 8)]


# ----------------------------------------------------------------------------------------------- brush RLE


def test_rle_matches_a_reference_vector():
    """18 byte values: a run of four 1s, six single values, a run of eight 4s (the converter's own test)."""
    values = [1, 1, 1, 1, 2, 3, 5, 6, 7, 8, 4, 4, 4, 4, 4, 4, 4, 4]
    packed = [0, 0, 0, 18, 57, 27, 252, 96, 32, 1, 0, 6, 0, 40, 0, 192, 3, 128, 17, 56, 32]
    assert pack_values(np.array(values)) == packed
    assert unpack_values(packed).tolist() == values


def test_rle_reads_literal_chunks_other_widths_and_word_sizes():
    """Hand-built streams: a literal chunk of three words, declared length widths 2/5/8/16, a 4-bit word size,
    a run longer than the widest length field of the encoder."""
    header = "00000000 00000000 00000000 00000101" + "00111" + "0001 0100 0111 1111"  # N=5, 8-bit words
    chunks = "0 00 10 00000101 00000110 00000111" + "1 01 00001 11111111"  # literal 5,6,7; run of two 255s
    assert unpack_values(_bits(header + chunks)).tolist() == [5, 6, 7, 255, 255]
    nibbles = "00000000 00000000 00000000 00000011" + "00011" + "0000 0000 0000 0000" + "0 00 1 1010 0011" + \
        "1 00 0 1111"  # N=3, 4-bit words, every length field one bit wide: literal 10, 3; then one 15
    assert unpack_values(_bits(nibbles)).tolist() == [10, 3, 15]
    long_run = np.full(200_000, 9, np.uint8)
    assert (unpack_values(pack_values(long_run)) == 9).all() and unpack_values(pack_values(long_run)).size == 200_000


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 1), (13, 17), (64, 48), (301, 299)])
def test_masks_round_trip_exactly(shape):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    for mask in (rng.random(shape) < 0.5, rng.random(shape) < 0.02, np.zeros(shape, bool), np.ones(shape, bool)):
        rle = encode_mask(mask)
        assert all(isinstance(v, int) and 0 <= v <= 255 for v in rle)
        decoded = decode_mask(rle, *shape)
        assert decoded.dtype == bool and decoded.shape == shape and (decoded == mask).all()
    # every channel of a mask pixel is 255, of the rest 0 (what Label Studio draws from the alpha channel)
    mask = rng.random(shape) < 0.5
    assert (unpack_values(encode_mask(mask)).reshape(*shape, 4) == (mask[..., None] * 255)).all()


def test_a_broken_rle_is_an_error_not_a_wrong_mask():
    rle = encode_mask(np.eye(6, dtype=bool))
    with pytest.raises(RleError, match="expected 100"):
        decode_mask(rle, 5, 5)  # another size
    with pytest.raises(RleError, match="ends inside"):
        decode_mask(rle[:-3], 6, 6)  # cut short
    with pytest.raises(RleError, match="0..255"):
        decode_mask([*rle[:-1], 256], 6, 6)
    with pytest.raises(RleError, match="shorter than the header"):
        unpack_values([0, 0, 0])
    with pytest.raises(RleError, match="past the 2 declared"):  # N=2, then a run of three
        unpack_values(_bits("0" * 30 + "10" + "00111 0010 0011 0111 1111" + "1 00 010 00000001"))
    with pytest.raises(RleError, match="list"):
        unpack_values("not a list")


# ------------------------------------------------------------------------------------------------ polygons


def _shapes(height: int = 40, width: int = 60) -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[:height, :width]
    return {"rectangle": (yy >= 5) & (yy < 20) & (xx >= 10) & (xx < 50),
            "disk": (yy - 20) ** 2 + (xx - 30) ** 2 <= 144,
            "ellipse": ((yy - 20) / 15) ** 2 + ((xx - 30) / 27) ** 2 <= 1,
            "triangle": (xx >= 10) & (yy >= 5) & (yy <= 35) & (xx - 10 <= yy - 5),
            "border": xx < 7, "pixel": (yy == 3) & (xx == 4)}


@pytest.mark.parametrize("name", list(_shapes()))
def test_convex_shapes_round_trip_through_polygons(name):
    mask = _shapes()[name]
    polygons = mask_polygons(mask)
    assert len(polygons) == 1 and polygons[0].shape[1] == 2
    back = polygon_mask(polygons[0], *mask.shape)
    assert (back & mask).sum() / (back | mask).sum() > 0.9
    assert (back == mask).all()  # no hole, so exact
    assert len(polygons[0]) <= 60  # simplified: straight edges are one segment, not one per pixel


def test_polygons_fill_holes_and_split_parts():
    ring = _shapes()["disk"] & ~((np.mgrid[:40, :60][0] - 20) ** 2 + (np.mgrid[:40, :60][1] - 30) ** 2 <= 16)
    two = np.zeros((10, 20), bool)
    two[2:5, 2:6], two[6:9, 10:18] = True, True
    [outer] = mask_polygons(ring)
    assert (polygon_mask(outer, 40, 60) == _shapes()["disk"]).all()  # the hole is lost
    parts = mask_polygons(two)
    assert len(parts) == 2 and abs(parts[0][:, 0].mean() - 14) < 1  # the larger part first
    assert (polygon_mask(parts[0], 10, 20) | polygon_mask(parts[1], 10, 20) == two).all()


# --------------------------------------------------------------------------------------- export -> import


def _pseudo_images(seed: int = 7) -> list[FakeImage]:
    """Random images, and one made by hand: a car in the wall, a person in the sky, a VOID hole in the wall."""
    rng = np.random.default_rng(seed)
    images = [random_image(stem, rng) for stem in PSEUDO]
    made = np.full((24, 32), 3, np.int64)
    made[12:] = 4
    made[2:7, 3:12], made[14:20, 3:10], made[6:9, 20:23], made[-1] = 1, 2, 0, 0
    # the things first, as a model's query order may have them
    images[1] = FakeImage(PSEUDO[1], made, {1: (17, False), 2: (3, False), 3: (0, False), 4: (92, False)})
    return images


@pytest.fixture
def world(tmp_path):
    """A dataset whose train_003..005 have no annotation, partition 'base' (train_000, train_001), and a
    pseudo-label output of train_002..005 that disagrees with the dataset's train_002."""
    rng = np.random.default_rng(0)
    root = write_dataset(tmp_path / "ds", {"train": [random_image(f"train_{i:03d}", rng) for i in range(6)],
                                           "val": [random_image("val_000", rng)]},
                         partitions={"base": ["train_000", "train_001"]})
    drop_annotations(root / "annotations" / "panoptic_train.json", set(UNLABELED))
    images = _pseudo_images()
    labels = write_pseudo_labels(tmp_path / "labels", images, root / "images" / "train", DEFAULT_CATEGORIES)
    return {"root": root, "labels": labels, "images": images, "tmp": tmp_path}


def _export(world, *extra: str) -> list[dict]:
    out = world["tmp"] / "ls"
    assert main(["export", "label-studio", str(world["labels"]), "--out", str(out), *extra]) == 0
    return json.loads((out / "tasks.json").read_text())


def _import(world, tasks: list[dict], partition: str = "corrected", *extra: str) -> int:
    path = world["tmp"] / f"export-{partition}.json"
    path.write_text(json.dumps(tasks))
    return main(["import", "label-studio", str(path), "--dataset", str(world["root"]), "--partition", partition,
                 "--base-partition", "base", *extra])


def _segments(masks: np.ndarray, labels: list[int]) -> set[tuple[bytes, int]]:
    return {(mask.tobytes(), int(label)) for mask, label in zip(masks, labels)}


def _pseudo_segments(image: FakeImage, cats: CategoryMap) -> set[tuple[bytes, int]]:
    return {((image.segment_map == k).tobytes(), cats.to_contiguous(c)) for k, (c, _) in image.segments.items()}


def test_untouched_tasks_import_as_the_pseudo_labels(world, capsys):
    tasks = _export(world)
    assert [t["data"]["dearli_stem"] for t in tasks] == PSEUDO
    assert tasks[0]["data"]["image"] == "/data/local-files/?d=train/train_002.jpg"  # below images/
    assert tasks[0]["predictions"][0]["model_version"] == f"dearli-{CHECKPOINT_SHA[:12]}"
    region = tasks[0]["predictions"][0]["result"][0]
    assert region["type"] == "brushlabels" and region["value"]["format"] == "rle"
    assert region["original_width"] == 32 and region["original_height"] == 24
    steps = capsys.readouterr().out
    assert f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={(world['root'] / 'images').resolve()}" in steps
    old_png = (world["root"] / "annotations" / "panoptic_train" / "train_002.png").read_bytes()

    assert _import(world, annotated_export(tasks)) == 0
    info = load_dataset(world["root"])
    split, cats = info.split("train"), info.categories
    for image in world["images"]:
        target = split.load_target(split.record(image.stem))
        assert _segments(target.masks, target.labels.tolist()) == _pseudo_segments(image, cats), image.stem
    partition = info.partition("corrected")
    assert partition.labeled == ("train_000", "train_001", *PSEUDO)
    assert len(partition.labeled_split(split)) == 6
    assert main(["data", "check", str(world["root"]), "--partition", "corrected", "--no-progress"]) == 0
    [record] = (world["root"] / "label_studio_imports").iterdir()
    assert (record / "replaced" / "panoptic" / "train_002.png").read_bytes() == old_png  # kept, not lost
    replaced = json.loads((record / "replaced.json").read_text())
    assert [a["file_name"] for a in replaced["annotations"]] == ["train_002.png"]
    assert split.record("train_002").panoptic_path.name == "train_002_1.png"  # a new name, nothing overwritten
    assert not (world["root"] / "annotations" / "panoptic_train" / "train_002.png").exists()
    assert "4 images (1 replacing an earlier annotation)" in capsys.readouterr().out


def test_polygon_tasks_import_close_to_the_pseudo_labels(world):
    tasks = _export(world, "--polygons", "--image-root", "https://host/img/")
    assert tasks[0]["data"]["image"] == "https://host/img/train/train_002.jpg"
    config = ET.fromstring((world["tmp"] / "ls" / "label_config.xml").read_text())
    assert config.find("PolygonLabels") is not None
    assert _import(world, annotated_export(tasks)) == 0
    info = load_dataset(world["root"])
    split = info.split("train")
    for image in world["images"]:
        target = split.load_target(split.record(image.stem))
        imported = dict(zip(target.labels.tolist(), target.masks))  # one segment per class in these images
        assert len(imported) == len(image.segments)
        for seg_id, (category, _) in image.segments.items():
            mask, back = image.segment_map == seg_id, imported[info.categories.to_contiguous(category)]
            assert (mask & back).sum() / (mask | back).sum() > 0.9
    hole = split.load_target(split.record(PSEUDO[1])).segment_map[8:11, 20:23]
    assert (hole != 0).all()  # the VOID hole is filled: the documented loss


def _split(result: dict) -> list[dict]:
    """A combined region as a config with separate shape and Labels tags writes it: two results, one id."""
    shape = {"brushlabels": "brush", "polygonlabels": "polygon"}[result["type"]]
    value = {k: v for k, v in result["value"].items() if k != result["type"]}
    return [{**result, "type": shape, "from_name": "shape", "value": value},
            {**result, "type": "labels", "value": {**value, "labels": result["value"][result["type"]]}}]


@pytest.mark.parametrize("polygons", [False, True], ids=["brush", "polygon"])
def test_split_shape_and_labels_regions_import_like_combined_ones(world, polygons):
    combined = annotated_export(_export(world, *(["--polygons"] if polygons else [])))
    split = json.loads(json.dumps(combined))
    for task in split:
        annotation = task["annotations"][0]
        annotation["result"] = [part for result in annotation["result"] for part in _split(result)]
    first = annotation["result"]
    first.insert(0, first.pop(1))  # a labels result may come before its shape
    assert _import(world, combined, "combined") == 0
    info = load_dataset(world["root"])
    expected = {stem: info.split("train").load_target(info.split("train").record(stem)) for stem in PSEUDO}
    assert _import(world, split, "split") == 0
    split_info = load_dataset(world["root"])
    assert split_info.partition("split").labeled == ("train_000", "train_001", *PSEUDO)
    for stem in PSEUDO:
        record = split_info.split("train").record(stem)
        assert record.panoptic_path != info.split("train").record(stem).panoptic_path  # imported again
        target = split_info.split("train").load_target(record)
        assert _segments(target.masks, target.labels.tolist()) == \
            _segments(expected[stem].masks, expected[stem].labels.tolist()), stem


def test_a_split_shape_without_labels_and_labels_without_a_shape_are_listed(world, capsys):
    tasks = annotated_export(_export(world))
    results = tasks[0]["annotations"][0]["result"]
    shape, labels = _split(results[0])
    results += [{**shape, "id": "lonely-shape"}, {**labels, "id": "lonely-labels"}, {**labels, "id": ["x"]}]
    assert _import(world, tasks) == 0
    [record] = (world["root"] / "label_studio_imports").iterdir()
    found = {(r["kind"], r["region"]) for r in csv.DictReader((record / "unusable.csv").open())}
    assert {("no-label", "lonely-shape"), ("unsupported", "lonely-labels"), ("unsupported", "['x']")} <= found


def test_every_unusable_region_is_listed(world, capsys):
    tasks = annotated_export(_export(world))
    results = tasks[0]["annotations"][0]["result"]
    brush = results[0]
    results += [
        {**brush, "id": "unknown", "value": {**brush["value"], "brushlabels": ["unicorn"]}},
        {**brush, "id": "empty", "value": {**brush["value"], "rle": encode_mask(np.zeros((24, 32), bool))}},
        {**brush, "id": "resized", "original_width": 64},
        {**brush, "id": "broken", "value": {**brush["value"], "rle": brush["value"]["rle"][:9]}},
        {**brush, "id": "two-labels", "value": {**brush["value"], "brushlabels": ["wall", "sky"]}},
        {"id": "choice", "type": "choices", "value": {"choices": ["ok"]}},
        {**brush, "id": "covered", "value": {**brush["value"], "brushlabels": ["car"]}},
        {**brush, "id": "cover"},  # paints the same pixels later
        {"id": "bad-polygon", "type": "polygonlabels", "value": {"points": [[1, 2]], "polygonlabels": ["car"]}},
        {**brush, "id": "stuff-crowd", "value": {**brush["value"], "rle": encode_mask(np.eye(24, 32, dtype=bool)),
                                                 "brushlabels": ["wall"]}},
        {"id": "stuff-crowd", "type": "choices", "from_name": "crowd", "value": {"choices": ["crowd"]}},
    ]
    tasks[1]["data"] = {"image": "/data/local-files/?d=pool/elsewhere.jpg"}  # not in the dataset
    tasks[2]["annotations"][0]["was_cancelled"] = True  # nothing else: not annotated
    tasks[3]["annotations"][0]["result"] = [{**brush, "id": "only", "value": {**brush["value"],
                                                                               "brushlabels": ["unicorn"]}}]
    tasks.append({"id": 99, "data": {}, "annotations": []})  # names no image
    earlier = {"id": 98, "data": tasks[0]["data"], "annotations": [{"id": 1, "result": []}]}
    tasks.insert(0, earlier)  # the same image as tasks[0], earlier in the file
    assert _import(world, tasks) == 0
    out = capsys.readouterr().out
    [record] = (world["root"] / "label_studio_imports").iterdir()
    rows = list(csv.DictReader((record / "unusable.csv").open()))
    found = {(r["kind"], r["region"] or r["stem"]) for r in rows}
    expected = {("unknown-class", "unknown"), ("empty-mask", "empty"), ("size-mismatch", "resized"),
                ("undecodable", "broken"), ("no-label", "two-labels"), ("unsupported", "choice"),
                ("hidden", "covered"), ("undecodable", "bad-polygon"), ("not-in-dataset", "elsewhere"),
                ("not-annotated", PSEUDO[2]), ("unknown-class", "only"), ("nothing-usable", PSEUDO[3]),
                ("no-image", "#"), ("superseded", PSEUDO[0]), ("crowd-stuff", "stuff-crowd")}
    found = {(kind, "#" if kind == "no-image" else where) for kind, where in found}
    assert expected <= found and {k for k, _ in found} == set(PROBLEM_KINDS)
    assert f"{len(rows)} task(s) or region(s) not imported" in out and "unknown-class 2" in out
    report = json.loads((record / "report.json").read_text())
    assert [i["stem"] for i in report["imported"]] == [PSEUDO[0]] and len(report["problems"]) == len(rows)
    assert load_dataset(world["root"]).partition("corrected").labeled == ("train_000", "train_001", PSEUDO[0])


def test_an_import_while_another_runs_is_refused_and_a_killed_one_leaves_no_lock(world, capsys):
    tasks = annotated_export(_export(world))
    files = {p: p.read_bytes() for p in world["root"].rglob("*") if p.is_file()}
    holder = subprocess.Popen(  # another import, holding the dataset's lock
        [sys.executable, "-c", "import sys, time; from dearli.annotation.dataset_import import import_lock\n"
         "with import_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)", str(world["root"])],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert _import(world, tasks) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{world['root']}: another import into this dataset is running" in err, err
        after = {p: p.read_bytes() for p in world["root"].rglob("*") if p.is_file()}
        assert after == files  # nothing read into a record, nothing written
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert _import(world, tasks) == 0  # the killed holder's lock went with it
    assert load_dataset(world["root"]).partition("corrected").labeled == ("train_000", "train_001", *PSEUDO)


def test_an_existing_partition_is_replaced_only_when_asked(world, capsys):
    tasks = annotated_export(_export(world))
    assert _import(world, tasks, "base") == 1  # 'base' exists
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "base/labeled.txt: exists already; pass --overwrite" in err
    train_json = world["root"] / "annotations" / "panoptic_train.json"
    before = train_json.read_bytes()
    assert not (world["root"] / "label_studio_imports").exists()
    assert train_json.read_bytes() == before
    old = (world["root"] / "partitions" / "base" / "labeled.txt").read_text()
    assert _import(world, tasks, "base", "--overwrite") == 0
    [record] = (world["root"] / "label_studio_imports").iterdir()
    assert (record / "previous_labeled.txt").read_text() == old
    assert load_dataset(world["root"]).partition("base").labeled == ("train_000", "train_001", *PSEUDO)


def test_a_failed_import_leaves_the_dataset_as_it_was(world, monkeypatch):
    tasks = annotated_export(_export(world))
    files = {p: p.read_bytes() for p in world["root"].rglob("*") if p.is_file()}

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(dataset_import, "check_json", fail)
    with pytest.raises(OSError):
        _import(world, tasks)
    after = {p: p.read_bytes() for p in world["root"].rglob("*") if p.is_file() and "label_studio_imports" not in
             p.parts}
    assert after == files


@pytest.mark.parametrize("case", ["not-a-list", "missing", "not-pseudo-labels", "no-partitions", "half-push",
                                  "existing-out"])
def test_bad_input_is_one_line_naming_the_file(world, case, capsys):
    tmp = world["tmp"]
    bad = tmp / "bad.json"
    bad.write_text('{"tasks": []}')
    export = ["export", "label-studio", str(world["labels"]), "--out", str(tmp / "ls")]
    imported = ["import", "label-studio", str(bad), "--dataset", str(world["root"]), "--partition", "x"]
    argv, expected = {
        "not-a-list": (imported, "bad.json: is not Label Studio's JSON export"),
        "missing": (imported[:2] + [str(tmp / "none.json")] + imported[3:], "none.json: not found"),
        "not-pseudo-labels": (["export", "label-studio", str(world["root"]), "--out", str(tmp / "o")],
                              "is not the output folder of 'dearli pseudo-label'"),
        "no-partitions": (imported[:4] + [str(write_dataset(tmp / "plain", {"train": []}))] + imported[5:],
                          "dataset.yaml: the dataset has no partitions folder"),
        "half-push": (export + ["--url", "http://localhost:8080"], "needs --url, --project ID or --create-project"),
        "existing-out": (export, "output already exists"),
    }[case]
    if case == "existing-out":
        assert main(export) == 0
        capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"dearli {argv[0]}: error: ") and expected in err, err


# ------------------------------------------------------------------------------------------- the pieces


def test_latest_annotation_that_was_not_cancelled_counts():
    task = {"annotations": [{"id": 1, "updated_at": "2024-01-03T00:00:00Z", "was_cancelled": True},
                            {"id": 2, "updated_at": "2024-01-02T00:00:00Z"},
                            {"id": 3, "created_at": "2024-01-01T00:00:00Z"}]}
    assert latest_annotation(task)["id"] == 2
    assert latest_annotation({"annotations": [task["annotations"][0]]}) is None
    assert latest_annotation({}) is None


def test_the_image_of_a_task():
    assert task_stem({"data": {"image": "x.jpg", "dearli_stem": "a.b"}}) == "a.b"
    assert task_stem({"data": {"image": "/data/local-files/?d=pool/my%20img.jpg"}}) == "my img"
    assert task_stem({"data": {"image": "https://host/imgs/000123.png?sig=1"}}) == "000123"
    assert task_stem({"data": {}}) is None


def test_later_regions_win_and_stuff_classes_merge():
    cats = CategoryMap.from_dicts(DEFAULT_CATEGORIES, "classes")
    masks = {name: np.zeros((4, 6), bool) for name in ("sky1", "sky2", "car1", "car2", "wall")}
    masks["sky1"][:2], masks["sky2"][3], masks["wall"][2] = True, True, True
    masks["car1"][:, :2], masks["car2"][:, 1:3] = True, True
    labels = {"sky1": "Sky", "sky2": "sky", "car1": "car", "car2": "car", "wall": "wall"}
    regions = [Region(name, labels[name], masks[name]) for name in ("sky1", "sky2", "wall", "car1", "car2")]
    segment_map, infos, problems = paint_regions(regions, (4, 6), class_lookup(cats))
    assert problems == []
    assert [(i["id"], i["category_id"]) for i in infos] == [(1, 92), (2, 0), (3, 17), (4, 17)]
    assert (segment_map[:, 0] == 3).all() and (segment_map[:, 1:3] == 4).all()  # car2 drawn over car1
    assert ((segment_map == 1) == ((masks["sky1"] | masks["sky2"]) & ~masks["car1"] & ~masks["car2"])).all()
    assert [i["area"] for i in infos] == [(segment_map == k).sum() for k in (1, 2, 3, 4)]
    assert class_lookup(cats)("girl").id == 3 and class_lookup(cats)("unicorn") is None


def test_a_crowd_choice_makes_a_crowd_thing_and_is_listed_on_stuff():
    cats = CategoryMap.from_dicts(DEFAULT_CATEGORIES, "classes")
    car, sky, car2 = np.zeros((3, 4, 6), bool)
    car[:2, :2], sky[3], car2[:2, 4:] = True, True, True
    results = [{"id": rid, "type": "brushlabels", "value": {"format": "rle", "rle": encode_mask(mask),
                                                             "brushlabels": [name]}}
               for rid, name, mask in (("car", "car", car), ("sky", "sky", sky), ("car2", "car", car2))]
    results += [{"id": "car", "type": "choices", "from_name": "crowd", "value": {"choices": ["Crowd"]}},
                {"id": "sky", "type": "choices", "from_name": "crowd", "value": {"choices": ["crowd"]}},
                {"id": "car2", "type": "choices", "from_name": "crowd", "value": {"choices": []}}]
    images, problems = annotated_images([{"id": 1, "data": {"image": "a.jpg"}, "annotations": [{"result": results}]}],
                                        lambda stem: (4, 6))
    assert problems == [] and [(r.region_id, r.crowd) for r in images[0].regions] == \
        [("car", True), ("sky", True), ("car2", False)]
    segment_map, infos, problems = paint_regions(images[0].regions, (4, 6), class_lookup(cats))
    assert [(i["category_id"], i["iscrowd"]) for i in infos] == [(17, 1), (92, 0), (17, 0)]
    assert [(p.kind, p.region) for p in problems] == [("crowd-stuff", "sky")]


def test_classes_sharing_a_display_name_cannot_be_labels():
    cats = CategoryMap.from_dicts([{"id": 1, "name": "car, auto", "isthing": 1},
                                   {"id": 2, "name": "car, cart", "isthing": 1}], "classes")
    with pytest.raises(DataError, match="labels.json: classes car share a display name"):
        class_names(cats, "labels.json")


def test_label_config_escapes_class_names():
    config = label_config(["a & b", 'say "hi"', "<tag>"])
    view = ET.fromstring(config)
    assert [label.get("value") for label in view.iter("Label")] == ["a & b", 'say "hi"', "<tag>"]
    assert view.find("BrushLabels").get("toName") == view.find("Image").get("name") == "image"
    crowd = view.find("Choices")
    assert (crowd.get("name"), crowd.get("perRegion"), crowd.find("Choice").get("value")) == ("crowd", "true", "crowd")


def test_a_task_scores_its_prediction_by_the_mean_segment_score():
    segment_map = np.array([[1, 1, 2], [0, 2, 2]])
    row = {"stem": "s", "segments": [{"id": 1, "category_name": "sky", "score": 0.5},
                                     {"id": 2, "category_name": "car", "score": 0.9}]}
    task = task_for_image(row, segment_map, "u", "v")
    prediction = task["predictions"][0]
    assert prediction["score"] == pytest.approx(0.7)
    assert [r["score"] for r in prediction["result"]] == [0.5, 0.9]
    assert (decode_mask(prediction["result"][1]["value"]["rle"], 2, 3) == (segment_map == 2)).all()
