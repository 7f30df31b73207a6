"""``dearli pseudo-label``: exact output after a killed run is rerun, new class lists, unreadable images,
lost actors; with a tiny untrained model (its thresholds at 0 so that it emits segments)."""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _services import kill_after_parts
from _tiny_model import KEEP_EVERY_QUERY, tiny_checkpoint
from PIL import Image

from dearli.caches.store import ERRORS_DIR, CacheStore, StaleWriterError
from dearli.caches.workers import CacheWorker
from dearli.cli import main
from dearli.data.coco_format import rgb2id
from dearli.data.panoptic import CategoryMap
from dearli.data.synth.writer import write_synth_dataset
from dearli.errors import DataError
from dearli.predict.commands.pseudo_label import _check_options, list_images
from dearli.predict.job import RayPseudoLabelWorker
from dearli.predict.outputs import (
    KIND,
    PANOPTIC_DIR,
    ROW_SCHEMA,
    assemble,
    keep_confident,
    panoptic_json_chunks,
    segments_table,
)
from dearli.predict.worker import png_bytes

BAD = "val_000001"  # the pool's truncated image


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A synthetic dataset, a checkpoint of it and a pool of its 12 images, one of them truncated."""
    root = tmp_path_factory.mktemp("pseudo")
    data = write_synth_dataset(root / "synth", num_images=8, seed=0, num_val=4, image_size=(64, 64))
    pool = root / "pool"
    pool.mkdir()
    for split in ("train", "val"):
        for image in (data / "images" / split).iterdir():
            shutil.copy(image, pool / image.name)
    (pool / f"{BAD}.png").write_bytes((pool / f"{BAD}.png").read_bytes()[:80])
    checkpoint = tiny_checkpoint(root / "run", data, KEEP_EVERY_QUERY, record_dataset=True, step=0, seed=1)
    return {"data": data, "pool": pool, "checkpoint": checkpoint}


def _args(world, out: Path, *extra: str) -> list[str]:
    return ["pseudo-label", "--checkpoint", str(world["checkpoint"]), "--images", str(world["pool"]),
            "--out", str(out), "--batch-size", "1", *extra]


@pytest.fixture(scope="module")
def reference(ray_local, world, tmp_path_factory):
    """An uninterrupted run over the pool."""
    out = tmp_path_factory.mktemp("reference") / "labels"
    assert main(_args(world, out, "--actors", "2")) == 0
    return out


def _outputs(out: Path) -> dict:
    """Everything a user reads: the JSON, the segment table, the decoded PNGs, the errors."""
    return {"json": json.loads((out / "panoptic.json").read_text()),
            "segments": pq.read_table(out / "segments.parquet").to_pylist(),
            "pngs": {p.name: rgb2id(np.asarray(Image.open(p))).tolist() for p in sorted((out / "panoptic").iterdir())},
            "errors": pq.read_table(out / "errors.parquet", columns=["stem", "reason"]).to_pylist()}


def _check_consistent(out: Path, images: int) -> dict:
    """One entry per image in JSON, parts and PNGs, and PNG ids equal to the JSON's segments."""
    result = _outputs(out)
    annotations = result["json"]["annotations"]
    assert len(annotations) == len({a["image_id"] for a in annotations}) == images
    assert sum(pq.read_metadata(p).num_rows for p in (out / "parts").glob("part-*.parquet")) == images
    assert sorted(result["pngs"]) == sorted(a["file_name"] for a in annotations)
    for ann in annotations:
        ids = set(np.unique(np.array(result["pngs"][ann["file_name"]])).tolist()) - {0}
        assert ids == {s["id"] for s in ann["segments_info"]}
    assert len(result["segments"]) == sum(len(a["segments_info"]) for a in annotations) > 0
    return result


def test_killed_run_rerun_equals_an_uninterrupted_run(world, reference, tmp_path, capsys):
    """SIGKILL of the whole job (driver, its own Ray, the actors) once parts are committed; the rerun ends with
    exactly the output of an uninterrupted run. The truncated image is in the errors table of both."""
    out = tmp_path / "killed"
    env = dict(os.environ, RAY_ADDRESS="local")  # its own Ray instance, killed with it
    committed = kill_after_parts(_args(world, out), out, env)
    assert 2 <= committed < 11 and not (out / "panoptic.json").exists()

    capsys.readouterr()
    assert main(_args(world, out)) == 0
    text = capsys.readouterr().out
    labelled, skipped, failed = map(int, re.search(r"(\d+) labelled, (\d+) skipped.*?(\d+) failed", text).groups())
    assert labelled + skipped == 11 and skipped >= committed and failed == 1
    resumed, full = _check_consistent(out, 11), _check_consistent(reference, 11)
    assert resumed == full
    assert [e["stem"] for e in full["errors"]] == [BAD] and "cannot read" in full["errors"][0]["reason"]


def test_review_page_of_pseudo_labels(world, reference, tmp_path, capsys):
    """`dearli review` reads a pseudo-label output: every labelled image, least sure first, with its scores."""
    page_dir = tmp_path / "review"
    assert main(["review", str(reference), "--out", str(page_dir)]) == 0
    page = (page_dir / "index.html").read_text()
    stems = [a["file_name"].removesuffix(".png") for a in json.loads((reference / "panoptic.json").read_text())[
        "annotations"]]
    assert len(stems) == 11 and all(f'data-stem="{stem}"' in page for stem in stems)
    confidences = [float(v) for v in re.findall(r'data-confidence="([0-9.]+)"', page)]
    assert confidences == sorted(confidences) and len(set(confidences)) > 1  # the class scores, not 1.0 each
    assert sorted(p.name for p in (page_dir / "images").iterdir()) == sorted(f"{s}.png" for s in stems)
    assert "disagreement not measured" in page


def test_a_renamed_class_list_changes_only_the_names(world, reference, tmp_path, capsys):
    """Open vocabulary: the same checkpoint labels with new class names (same ids and kinds) given as
    --classes; images come from a list file this time."""
    old = json.loads((world["data"] / "classes.json").read_text())
    new = [{"id": c["id"], "name": f"kind {c['id']}, sort {c['id']}", "isthing": c["isthing"]} for c in old]
    classes = tmp_path / "renamed.json"
    classes.write_text(json.dumps(new))
    listing = tmp_path / "pool.txt"
    listing.write_text("\n".join(os.path.relpath(p, tmp_path) for p in sorted(world["pool"].iterdir())) + "\n")
    out = tmp_path / "renamed"
    args = _args(world, out, "--classes", str(classes))
    args[args.index("--images") + 1] = str(listing)
    assert main(args) == 0
    assert "11 labelled, 0 skipped (labelled before), 1 failed" in capsys.readouterr().out
    renamed, full = _check_consistent(out, 11), _outputs(reference)
    names = {s["category_name"] for s in renamed["segments"]}
    assert names and names <= {f"kind {c['id']}" for c in old}
    assert not names & {c["name"].split(",")[0] for c in old}
    assert {s["category_name"] for s in full["segments"]} <= {c["name"].split(",")[0] for c in old}
    assert renamed["json"]["categories"] == [{"id": c["id"], "name": c["name"], "isthing": int(c["isthing"])}
                                             for c in new]
    assert [a["image_id"] for a in renamed["json"]["annotations"]] == [a["image_id"] for a in
                                                                       full["json"]["annotations"]]
    assert renamed["errors"] == full["errors"]
    # the manifest records the class list: the same output location with the original classes is refused
    assert main(_args(world, out)) == 1
    assert "different settings (classes)" in capsys.readouterr().err


def test_keep_confident_unlabels_low_scores():
    panoptic = np.array([[1, 1, 2], [3, 3, 0]], dtype=np.int32)
    segments = [{"id": 1, "score": 0.9}, {"id": 2, "score": 0.2}, {"id": 3, "score": 0.5}]
    kept_map, kept = keep_confident(panoptic, segments, 0.5)
    assert [s["id"] for s in kept] == [1, 3]
    assert kept_map.tolist() == [[1, 1, 0], [3, 3, 0]] and panoptic[0, 2] == 2  # input untouched


def test_list_images_from_a_directory_or_a_list(tmp_path):
    for name in ("b.png", "a.JPG", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [r["stem"] for r in list_images(tmp_path)] == ["a", "b"]
    listing = tmp_path / "list.txt"
    listing.write_text("# pool\nb.png\n\n" + str(tmp_path / "missing.jpg") + "\n")
    rows = list_images(listing)
    root = tmp_path.resolve()
    assert [r["image_path"] for r in rows] == [str(root / "b.png"), str(root / "missing.jpg")]
    listing.write_text("a.JPG\nsub/a.png\n")
    with pytest.raises(DataError, match="two images named 'a'"):
        list_images(listing)


class DiesOnce(CacheWorker):
    """Records {stem}; the process running it dies at its first sight of image 3 (a lost actor)."""

    schema = pa.schema([("image_id", pa.string()), ("stem", pa.string())])

    def __init__(self, cache_uri: str, run_id: str, marker: str):
        super().__init__(cache_uri, run_id)
        self.marker = Path(marker)

    def _one(self, item: dict) -> dict:
        if item["stem"] == "img3" and not self.marker.exists():
            self.marker.touch()
            os._exit(1)
        return {"image_id": item["image_id"], "stem": item["stem"]}


def test_a_lost_actor_is_replaced_and_nothing_is_lost(ray_local, tmp_path):
    from dearli.caches.job import run_cache_job

    rows = [{"image_id": str(i), "stem": f"img{i}", "image_path": "", "height": 0, "width": 0} for i in range(6)]
    lines: list[str] = []
    module = sys.modules[__name__]  # actors cannot import this test module: send DiesOnce by value
    ray_local.cloudpickle.register_pickle_by_value(module)
    try:
        summary = run_cache_job(str(tmp_path / "out"), "test", {}, rows, DiesOnce,
                                {"marker": str(tmp_path / "died")}, images_per_part=1, echo=lines.append)
    finally:
        ray_local.cloudpickle.unregister_pickle_by_value(module)
    assert (tmp_path / "died").exists() and any("an actor was lost" in line for line in lines)
    assert (summary.done, summary.failed) == (6, 0)
    store = CacheStore(str(tmp_path / "out"))
    stems = [s for p in store.part_files() for s in pq.read_table(p).column("stem").to_pylist()]
    assert sorted(stems) == [f"img{i}" for i in range(6)]


class FullDiskAfter(RayPseudoLabelWorker):
    """Its PNG writes fail with ENOSPC once ``good`` of them went through (a disk that fills up)."""

    good = 3

    def _write_png(self, file_name: str, panoptic: np.ndarray) -> None:
        self.writes = getattr(self, "writes", 0) + 1
        if self.writes <= self.good:
            return super()._write_png(file_name, panoptic)
        full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        with mock.patch("dearli.caches.store._write_file", side_effect=full):
            return super()._write_png(file_name, panoptic)


def test_a_full_disk_stops_the_job_and_a_rerun_finishes_it(ray_local, world, reference, tmp_path, monkeypatch,
                                                            capsys):
    """A disk that fills up after 3 PNGs: one error line naming the file and the errno, exit 1, nothing recorded
    as an unreadable image, the 3 images kept; the rerun labels the rest, equal to an uninterrupted run."""
    import dearli.predict.job as job

    out = tmp_path / "full"
    module = sys.modules[__name__]  # actors cannot import this test module: send FullDiskAfter by value
    run = job.run_cache_job
    monkeypatch.setattr(job, "run_cache_job", lambda uri, kind, settings, rows, _cls, *args, **kwargs: run(
        uri, kind, settings, rows, FullDiskAfter, *args, **kwargs))
    ray_local.cloudpickle.register_pickle_by_value(module)
    try:
        assert main(_args(world, out)) == 1
    finally:
        ray_local.cloudpickle.unregister_pickle_by_value(module)
    monkeypatch.undo()
    text = capsys.readouterr()
    lines = [line for line in text.err.splitlines() if line.startswith("dearli pseudo-label: error:")]
    assert len(lines) == 1 and "/panoptic/" in lines[0] and ".png" in lines[0], text.err
    assert "errno 28 ENOSPC" in lines[0] and "disk is full" in lines[0] and "labelled" not in text.out
    store = CacheStore(str(out))
    assert len(store.committed_stems()) == FullDiskAfter.good and not (out / "panoptic.json").exists()
    recorded = [row for p in store.part_files(ERRORS_DIR) for row in pq.read_table(p).to_pylist()]
    assert all(row["stem"] == BAD for row in recorded)  # an unreadable image at most, never the disk

    assert main(_args(world, out)) == 0
    found = re.search(r"(\d+) labelled, (\d+) skipped.*?(\d+) failed", capsys.readouterr().out)
    assert tuple(map(int, found.groups())) == (11 - FullDiskAfter.good, FullDiskAfter.good, 1)
    assert _check_consistent(out, 11) == _check_consistent(reference, 11)
    assert not list(out.rglob(".*.tmp-*")) and not list((out / "_tmp").iterdir())


CLASSES = [{"id": 1, "name": "sky", "isthing": False}]


def _commit_labelled(store: CacheStore, run_id: str, *stems: str) -> None:
    """Rows of ``stems`` (no segment) with their PNGs, as a worker of ``run_id`` commits them."""
    for stem in stems:
        (Path(store.root) / PANOPTIC_DIR / f"{stem}.png").write_bytes(png_bytes(np.zeros((2, 2), np.int32)))
    rows = [{"image_id": s, "stem": s, "image_path": f"/pool/{s}.png", "height": 2, "width": 2,
             "file_name": f"{s}.png", "segments": []} for s in stems]
    store.commit(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), run_id)


def test_only_the_lease_holder_assembles_and_a_lost_png_is_labelled_again(tmp_path, capsys):
    """Two drivers on one output: the one that lost the lease refuses to assemble and deletes nothing, the newer
    one publishes; a committed row whose PNG is gone is uncommitted instead of published."""
    out = tmp_path / "labels"
    store = CacheStore(str(out))
    store.open_for_writing(KIND, {})
    (out / PANOPTIC_DIR).mkdir()
    store.take_lease("run-a")
    _commit_labelled(store, "run-a", "a", "b")
    store.take_lease("run-b")  # a newer driver on the same --out; its worker has written c.png, not committed
    (out / PANOPTIC_DIR / "c.png").write_bytes(b"png of run-b")
    categories = CategoryMap.from_dicts(CLASSES, "classes")
    files = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(StaleWriterError, match="another run took over the output"):
        assemble(str(out), categories, "run-a")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == files  # nothing deleted or written
    (out / PANOPTIC_DIR / "c.png").unlink()
    _commit_labelled(store, "run-b", "c")
    store.mark_success({"run_id": "run-b"})
    (out / PANOPTIC_DIR / "b.png").unlink()  # lost: the row must not be published without it
    counts = assemble(str(out), categories, "run-b")
    assert counts["missing"] == ["b"] and counts["images"] == 2
    assert [a["file_name"] for a in json.loads((out / "panoptic.json").read_text())["annotations"]] == \
        ["a.png", "c.png"]
    assert store.committed_stems() == {"a", "c"} and not store.has_success()  # b is done again by a rerun
    _commit_labelled(store, "run-b", "b")
    assert assemble(str(out), categories, "run-b")["images"] == 3


@pytest.mark.parametrize("rows_per_chunk", [1, 2, 100])
def test_the_json_written_in_chunks_is_the_whole_dict_dumped(rows_per_chunk):
    categories = CategoryMap.from_dicts(CLASSES + [{"id": 7, "name": "car, auto", "isthing": True}], "classes")
    segment = {"id": 3, "category_id": 7, "category_name": "car", "isthing": True, "score": 0.25, "area": 4,
               "bbox": [0.0, 1.0, 2.0, 2.0]}
    rows = [{"image_id": f"i{k}", "stem": f"s{k}", "image_path": f"C:\\pool\\s{k}.jpg", "height": 3, "width": 4,
             "file_name": f"s{k}.png", "segments": [{**segment, "id": j + 1} for j in range(k % 3)]}
            for k in range(5)]
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    expected = {
        "images": [{"id": r["image_id"], "file_name": f"{r['stem']}.jpg", "height": 3, "width": 4} for r in rows],
        "annotations": [{"image_id": r["image_id"], "file_name": r["file_name"], "segments_info": [
            {"id": s["id"], "category_id": 7, "iscrowd": 0, "isthing": 1, "area": 4, "bbox": s["bbox"],
             "score": 0.25} for s in r["segments"]]} for r in rows],
        "categories": [c.to_dict() for c in categories.categories]}
    assert b"".join(panoptic_json_chunks(table, categories, rows_per_chunk)) == json.dumps(expected).encode()
    assert b"".join(panoptic_json_chunks(table.slice(0, 0), categories)) == json.dumps(
        {"images": [], "annotations": [], "categories": expected["categories"]}).encode()
    flat = segments_table(table).to_pylist()
    assert [(f["stem"], f["segment_id"]) for f in flat] == [(r["stem"], s["id"]) for r in rows for s in r["segments"]]
    assert all(f["image_path"].endswith(f"{f['stem']}.jpg") and f["score"] == 0.25 for f in flat)


def test_a_killed_first_manifest_write_does_not_block_a_rerun(tmp_path):
    out = tmp_path / "labels"
    out.mkdir()
    (out / ".cache.json.tmp-1a2b3c4d").write_text('{"kind": "pseu')  # killed before its rename
    args = argparse.Namespace(out=str(out), min_score=0.0, alpha_clip=None, actors=1, batch_size=1)
    _check_options(args)
    (out / "notes.txt").write_text("someone's folder")
    with pytest.raises(DataError, match="holds no pseudo-labels"):
        _check_options(args)
