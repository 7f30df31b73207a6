"""UniMatch/SemiVL partition files: parsing, labeled/unlabeled selection, errors, the standard lists."""

from __future__ import annotations

from pathlib import Path

import pytest
from _panoptic_factory import small_dataset, write_partition

from dearli.cli import main
from dearli.data.dataset import load_dataset
from dearli.data.partitions import partition_names, read_partition, read_partition_file, stem_of
from dearli.errors import DataError

SHARED_SPLITS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "splits"


@pytest.fixture
def dataset(tmp_path):
    return small_dataset(tmp_path / "ds", n_train=5, n_val=1,
                         partitions={"1_2": ["train_003", "train_000"], "1_4": ["train_001"]})


def test_stem_of():
    assert stem_of("images/training/ADE_train_00001609.jpg") == "ADE_train_00001609"
    assert stem_of("train2017/000000177254.jpg") == "000000177254"
    assert stem_of("a\\b\\c.png") == "c"


def test_labeled_and_unlabeled(dataset):
    info = load_dataset(dataset)
    assert info.partition_names() == ["1_2", "1_4"]
    part = info.partition("1_2")
    assert part.name == "1_2" and part.labeled == ("train_003", "train_000")
    split = info.split("train")
    assert part.labeled_split(split).stems == ["train_003", "train_000"]  # file order
    assert part.unlabeled(split) == ("train_001", "train_002", "train_004")
    assert split.subset(part).stems == ["train_003", "train_000"]
    with pytest.raises(DataError, match="partition '1_8' not found.*1_2, 1_4"):
        info.partition("1_8")


def test_blank_lines_and_missing_final_newline(tmp_path):
    path = write_partition(tmp_path, "p", ["", "a", "", "  ", "b", "c"], final_newline=False)
    assert not path.read_bytes().endswith(b"\n")
    part = read_partition_file(path)
    assert part.labeled == ("a", "b", "c") and part.line_numbers == (2, 5, 6) and part.name == "p"
    single = tmp_path / "single.txt"
    single.write_text("images/x/only.jpg")  # image path alone, no newline
    assert read_partition_file(single, name="s").labeled == ("only",)


def test_empty_partition(tmp_path):
    path = write_partition(tmp_path, "empty", ["", "   "])
    with pytest.raises(DataError, match="lists no image") as err:
        read_partition_file(path)
    assert err.value.path == str(path)


def test_malformed_and_duplicate_lines(tmp_path):
    path = write_partition(tmp_path, "bad", ["a", "img/b.jpg ann/b.png extra"])
    with pytest.raises(DataError, match="line 2: expected 'image_path mask_path'") as err:
        read_partition_file(path)
    assert err.value.path == str(path)
    path = write_partition(tmp_path, "dup", ["a", "b", "a"])
    with pytest.raises(DataError, match="line 3: image 'a' is already listed on line 1"):
        read_partition_file(path)


def test_line_naming_missing_image(dataset):
    path = write_partition(dataset, "1_2", ["train_000", "", "ghost_007"])
    info = load_dataset(dataset)
    part = info.partition("1_2")
    split = info.split("train")
    with pytest.raises(DataError, match="line 3: image 'ghost_007' is not in split 'train'") as err:
        part.labeled_split(split)
    assert err.value.path == str(path)
    assert part.missing(split) == [(3, "ghost_007")]
    assert main(["data", "check", str(dataset), "--partition", "1_2", "--no-progress"]) == 1


def test_shared_val_list(dataset):
    (dataset / "partitions" / "val.txt").write_text("images/val/val_000.jpg x.png")
    assert load_dataset(dataset).partition("1_4").val == ("val_000",)
    assert partition_names(dataset / "partitions") == ["1_2", "1_4"]


@pytest.mark.skipif(not SHARED_SPLITS.is_dir(), reason="standard partition lists not available")
def test_standard_partition_lists():
    ade = SHARED_SPLITS / "ade"
    counts = {"1_128": 158, "1_64": 316, "1_32": 632, "1_16": 1263, "1_8": 2526}
    assert partition_names(ade) == ["1_8", "1_16", "1_32", "1_64", "1_128"]
    previous: tuple[str, ...] = ()
    for name, count in counts.items():
        part = read_partition(ade, name)
        assert len(part) == count
        assert part.labeled[: len(previous)] == previous  # nested lists
        previous = part.labeled
        assert all(s.startswith("ADE_train_") and len(s) == len("ADE_train_00001609") for s in part.labeled)
    assert read_partition(ade, "1_128").labeled[0] == "ADE_train_00001609"
    assert len(read_partition(ade, "1_8").val) == 2000  # the shared ade/val.txt
    coco = read_partition(SHARED_SPLITS / "coco", "1_512")
    assert len(coco) == 232 and int(coco.labeled[0]) == 177254
    assert all(s.isdigit() and len(s) == 12 for s in coco.labeled)
    files = [p for p in SHARED_SPLITS.rglob("*.txt")]
    assert any(not p.read_bytes().endswith(b"\n") for p in files)  # the format tolerates this
