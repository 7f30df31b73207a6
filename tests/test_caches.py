"""SAM / CLIP caches: commit protocol, resume after interruption, error table, readers."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from _faults import Killed, killed_before_rename
from _reference import expected_geometry
from PIL import Image

from dearli.caches.clip_features import build_cache_backbone, dense_feature
from dearli.caches.generators import GeneratorSpec, build_generator
from dearli.caches.readers import decode_feature, decode_masks, read_clip_cache, read_sam_cache
from dearli.caches.records import SAM_SCHEMA, decode_rles, encode_masks, load_rgb, sam_row
from dearli.caches.store import CacheStore
from dearli.caches.workers import CacheWorker
from dearli.cli import main
from dearli.data.coco_format import id2rgb
from dearli.errors import ConfigError, DataError

CATEGORIES = [{"id": 1, "name": "sky", "isthing": 0}, {"id": 2, "name": "grass, lawn", "isthing": 0},
              {"id": 5, "name": "car", "isthing": 1}, {"id": 7, "name": "dog", "isthing": 1}]
COLOURS = {1: (90, 150, 230), 2: (60, 170, 60), 5: (200, 30, 30), 7: (150, 100, 50)}
# A random tiny SAM whose masks pass every threshold; the command's flags are built from it, so the reference
# below (the same generator without Ray) cannot drift from what the command runs.
TINY_SAM = GeneratorSpec(kind="sam", sam_type="tiny", points_per_side=4, points_per_batch=16, pred_iou_thresh=0.0,
                         stability_score_thresh=0.0)
TINY_SAM_ARGS = ["--generator", TINY_SAM.kind, "--sam-type", TINY_SAM.sam_type,
                 "--points-per-side", str(TINY_SAM.points_per_side),
                 "--points-per-batch", str(TINY_SAM.points_per_batch),
                 "--pred-iou-thresh", str(TINY_SAM.pred_iou_thresh),
                 "--stability-score-thresh", str(TINY_SAM.stability_score_thresh), "--actors", "2",
                 "--images-per-part", "2"]  # images per part last: a test replaces it


def make_dataset(root: Path, num_images: int = 8, split: str = "train", seed: int = 0) -> Path:
    """A small panoptic dataset: sky/grass stuff split by a horizon, a car and a dog box per image."""
    rng = np.random.default_rng(seed)
    img_dir, pan_dir = root / "images" / split, root / "annotations" / f"panoptic_{split}"
    img_dir.mkdir(parents=True)
    pan_dir.mkdir(parents=True)
    images, annotations = [], []
    for i in range(num_images):
        h, w = int(rng.integers(64, 97)), int(rng.integers(64, 97))
        seg = np.where(np.arange(h)[:, None] < int(rng.integers(h // 3, 2 * h // 3)), 1, 2) * np.ones((1, w), int)
        cats = {1: 1, 2: 2}
        for sid, cat in ((3, 5), (4, 7)):
            y, x = int(rng.integers(0, h - 20)), int(rng.integers(0, w - 20))
            seg[y:y + int(rng.integers(12, 20)), x:x + int(rng.integers(12, 20))] = sid
            cats[sid] = cat
        image, infos = np.zeros((h, w, 3)), []
        for sid, cat in cats.items():
            mask = seg == sid
            if mask.any():
                image[mask] = COLOURS[cat]
                ys, xs = np.nonzero(mask)
                infos.append({"id": sid, "category_id": cat, "area": int(mask.sum()), "iscrowd": 0,
                              "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]})
        image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(img_dir / f"img{i:03d}.png")
        Image.fromarray(id2rgb(seg)).save(pan_dir / f"img{i:03d}.png")
        images.append({"id": i, "file_name": f"img{i:03d}.png", "height": h, "width": w})
        annotations.append({"image_id": i, "file_name": f"img{i:03d}.png", "segments_info": infos})
    (root / "annotations" / f"panoptic_{split}.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    (root / "dataset.yaml").write_text(
        f"name: fab\nsplits:\n  {split}:\n    image_dir: images/{split}\n"
        f"    panoptic_json: annotations/panoptic_{split}.json\n    panoptic_dir: annotations/panoptic_{split}\n")
    return root


def corrupt(path: Path) -> bytes:
    """Truncate an image file (header readable, pixels not); returns the original bytes."""
    data = path.read_bytes()
    path.write_bytes(data[:80])
    return data



def test_rle_roundtrip_and_sam_row():
    rng = np.random.default_rng(1)
    masks = rng.random((3, 17, 23)) > 0.6
    assert np.array_equal(decode_rles(encode_masks(masks), 17, 23), masks)
    assert decode_rles([], 5, 6).shape == (0, 5, 6)
    table = pa.Table.from_pylist([sam_row("3", "a", 5, 6, [])], schema=SAM_SCHEMA)
    assert table.column("rle_counts").to_pylist() == [[]]


def test_load_rgb_errors(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(path)
    assert load_rgb(str(path), 10, 12).shape == (10, 12, 3)
    with pytest.raises(DataError, match="annotations say"):
        load_rgb(str(path), 11, 12)
    with pytest.raises(DataError, match="too large"):
        load_rgb(str(path), max_pixels=100)
    corrupt(path)
    with pytest.raises(DataError, match="cannot read"):
        load_rgb(str(path))


def test_store_ignores_uncommitted_and_dedupes(tmp_path):
    store = CacheStore(str(tmp_path / "c"))
    store.open_for_writing("sam", {"a": 1})
    rows = [sam_row(str(i), f"s{i}", 4, 4, []) for i in range(3)]
    store.commit(pa.Table.from_pylist(rows[:2], schema=SAM_SCHEMA), "r1")
    store.commit(pa.Table.from_pylist(rows[1:], schema=SAM_SCHEMA), "r2")  # s1 again
    store.commit(pa.Table.from_pylist(rows[1:], schema=SAM_SCHEMA), "r2")  # a retried batch replaces its part
    assert len(store.part_files()) == 2
    (tmp_path / "c" / "_tmp" / "part-r3-x.parquet").write_bytes(b"PAR1 half written")
    reader = read_sam_cache(str(tmp_path / "c"))
    assert sorted(reader) == ["s0", "s1", "s2"]
    assert reader["s2"]["image_id"] == "2"
    with pytest.raises(ConfigError, match="different settings"):
        CacheStore(str(tmp_path / "c")).open_for_writing("sam", {"a": 2})
    with pytest.raises(DataError, match="expected a 'clip' cache"):
        read_clip_cache(str(tmp_path / "c"))


def test_tiny_sam_generator_is_deterministic_and_yields_masks():
    spec = GeneratorSpec(kind="sam", sam_type="tiny", points_per_side=4, points_per_batch=16,
                         pred_iou_thresh=0.0, stability_score_thresh=0.0)
    image = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    first, second = build_generator(spec).generate(image), build_generator(spec).generate(image)
    assert len(first) > 0 and len(first) == len(second)
    for a, b in zip(first, second):
        assert a.segmentation.shape == (70, 90) and a.area == int(a.segmentation.sum()) > 0
        assert np.array_equal(a.segmentation, b.segmentation)
    with pytest.raises(ConfigError, match="sam_checkpoint"):
        build_generator(GeneratorSpec(kind="sam", sam_type="vit_b"))


def _sam_rows(uri: str) -> dict[str, dict]:
    reader = read_sam_cache(uri)
    return {stem: reader[stem] for stem in reader}


def uninterrupted(data: Path, out: Path, spec: GeneratorSpec = TINY_SAM) -> dict[str, dict]:
    """The rows an uninterrupted job caches: the job's worker class (what each actor runs) called here on
    every image of the train split at once, committed as one part and read back; no Ray (a job costs seconds)."""
    from dearli.caches.commands import image_rows
    from dearli.caches.workers import SamWorker

    _, rows = image_rows(str(data), "train")
    CacheStore(str(out)).open_for_writing("sam", spec.settings())
    status = SamWorker(str(out), "reference", dataclasses.asdict(spec))(
        {key: np.array([row[key] for row in rows], dtype=object) for key in rows[0]})
    assert len(status["stem"]) == len(rows)
    return _sam_rows(str(out))


def test_sam_cache_resume_equals_uninterrupted(ray_local, tmp_path, capsys):
    data = make_dataset(tmp_path / "ds")
    bad = data / "images" / "train" / "img005.png"
    good_bytes = corrupt(bad)
    base = ["cache", "sam", "--dataset", str(data)] + TINY_SAM_ARGS

    # An interrupted run: 3 images committed, then a crash that leaves a half-written temp part.
    out = tmp_path / "resumed"
    assert main(base + ["--out", str(out), "--limit", "3"]) == 0
    (out / "_tmp").mkdir(exist_ok=True)
    (out / "_tmp" / "part-crashed-0.parquet").write_bytes(b"PAR1\x00\x00 truncated")
    assert main(base + ["--out", str(out)]) == 0
    assert "8 images: 4 done, 3 skipped (already cached), 1 failed" in capsys.readouterr().out

    full, resumed = uninterrupted(data, tmp_path / "full"), _sam_rows(str(out))
    stems = [f"img{i:03d}" for i in range(8) if i != 5]
    assert sorted(full) == sorted(resumed) == stems
    total = sum(len(pa.parquet.read_table(p).column("stem")) for p in (out / "parts").glob("part-*.parquet"))
    assert total == len(stems)  # each image exactly once on storage, not just after reader dedupe
    for stem in stems:
        assert full[stem] == resumed[stem]
        masks = decode_masks(resumed[stem])
        assert masks.shape[1:] == (resumed[stem]["height"], resumed[stem]["width"]) and len(masks) > 0
        assert masks.sum((1, 2)).tolist() == resumed[stem]["area"]
    errors = read_sam_cache(str(out)).errors().to_pylist()
    assert [e["stem"] for e in errors] == ["img005"] and "cannot read" in errors[0]["reason"]

    bad.write_bytes(good_bytes)  # fixed: the next run retries the failed image only
    assert main(base + ["--out", str(out)]) == 0
    assert "1 done, 7 skipped (already cached), 0 failed (1 retried" in capsys.readouterr().out
    reader = read_sam_cache(str(out))
    assert len(reader) == 8 and reader.errors().num_rows == 0 and reader.complete
    assert not list((out / "errors").glob("part-*.parquet"))


def test_clip_cache_resume_and_features(ray_local, tmp_path, capsys):
    data = make_dataset(tmp_path / "ds", num_images=6, seed=3)
    out = tmp_path / "clip"
    base = ["cache", "clip", "--dataset", str(data), "--out", str(out), "--preset", "tiny", "--actors", "2",
            "--images-per-part", "2", "--short-side", "64"]
    assert main(base + ["--limit", "2"]) == 0
    assert main(base) == 0
    assert "4 done, 2 skipped" in capsys.readouterr().out.splitlines()[-1]
    reader = read_clip_cache(str(out))
    assert sorted(reader) == [f"img{i:03d}" for i in range(6)] and reader.complete
    backbone = build_cache_backbone("dearli-convnext-atto", "")
    for stem in ("img000", "img004"):
        row = reader[stem]
        image = load_rgb(str(data / "images" / "train" / f"{stem}.png"))
        direct, scale, resized, padded = dense_feature(backbone, image, reader.settings)
        cached = decode_feature(row)
        assert cached.dtype == np.float16 and cached.shape == direct.shape
        # Same seeded weights in every actor; only float summation order (thread count) may differ.
        np.testing.assert_allclose(cached.astype(np.float32), direct.astype(np.float32), rtol=4e-3, atol=4e-3)
        assert (tuple(row["resized_hw"]), tuple(row["padded_hw"])) == expected_geometry(
            row["height"], row["width"], reader.settings) == (resized, padded)
        assert min(resized) == 64 and row["scale"] == pytest.approx(scale)
        assert cached.shape[1:] == (padded[0] // 32, padded[1] // 32)
    text = pa.parquet.read_table(out / "text.parquet")
    assert text.column("synonym").to_pylist() == ["sky", "grass", "lawn", "car", "dog"]
    assert text.column("class_index").to_pylist() == [0, 1, 1, 2, 3]
    emb = torch.tensor(text.column("embedding").to_pylist())
    assert torch.allclose(emb.norm(dim=-1), torch.ones(5), atol=1e-5)


def test_sam_cache_survives_a_killed_job(ray_local, tmp_path, capsys):
    """A real crash: the job's whole process group (driver, its Ray instance, the actors) is SIGKILLed once
    some parts are committed; a rerun completes the cache with every image exactly once, as an
    uninterrupted run has it."""
    import os

    from _services import kill_after_parts

    data = make_dataset(tmp_path / "ds", num_images=16, seed=5)
    args = ["cache", "sam", "--dataset", str(data)] + TINY_SAM_ARGS[:-1] + ["1"]  # one image per part
    out = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    committed = kill_after_parts(args + ["--out", str(out)], out, env)
    assert 2 <= committed < 16 and not (out / "_SUCCESS").exists()

    assert main(args + ["--out", str(out)]) == 0
    # a worker of the killed job may still commit before the rerun starts: count what the rerun saw
    done, skipped = map(int, re.search(r"(\d+) done, (\d+) skipped", capsys.readouterr().out).groups())
    assert done + skipped == 16 and skipped >= committed
    resumed, full = _sam_rows(str(out)), uninterrupted(data, tmp_path / "full")
    assert sorted(resumed) == sorted(full) == [f"img{i:03d}" for i in range(16)]
    total = sum(len(pa.parquet.read_table(p).column("stem")) for p in (out / "parts").glob("part-*.parquet"))
    assert total == 16
    for stem in full:
        assert resumed[stem] == full[stem]


def test_superseded_writer_cannot_commit_and_duplicates_are_dropped(tmp_path):
    from dearli.caches.store import CacheStore, StaleWriterError

    store = CacheStore(str(tmp_path / "cache"))
    store.open_for_writing("sam", {"x": 1})
    rows = lambda *stems: pa.Table.from_pylist([{"stem": s, "v": i} for i, s in enumerate(stems)])  # noqa: E731
    store.take_lease("run-b")
    with pytest.raises(StaleWriterError, match="superseded"):
        store.commit(rows("a"), "run-a")
    assert store.part_files() == [] and not list((tmp_path / "cache" / "_tmp").iterdir())
    store.commit(rows("a", "b"), "run-b")
    store.commit(rows("b", "c"), "run-b")  # "b" twice, as an overlapping writer could leave it
    store.commit(rows("c"), "run-b")
    assert store.drop_duplicate_rows() == 2
    stems = [pa.parquet.read_table(p).column("stem").to_pylist() for p in store.part_files()]
    assert sorted(sum(stems, [])) == ["a", "b", "c"]


def test_compact_merges_small_parts_and_keeps_every_row_once(tmp_path):
    store = CacheStore(str(tmp_path / "cache"))
    store.open_for_writing("sam", {"x": 1})
    store.take_lease("run-a")
    noise = np.random.default_rng(0)  # incompressible rows: a part's size grows with its rows
    for i in range(10):
        store.commit(pa.Table.from_pylist([{"stem": f"s{j:02d}", "v": noise.bytes(1000)} for j in (2 * i, 2 * i + 1)]),
                     "run-a")
    size = max(p.stat().st_size for p in (tmp_path / "cache" / "parts").iterdir())
    assert store.compact("run-a", target_bytes=4 * size) == 10 - 3  # groups of 4, 4 and 2 parts
    rows = [pa.parquet.read_table(p).num_rows for p in store.part_files()]
    assert sorted(rows) == [4, 8, 8]
    stems = [s for p in store.part_files() for s in pa.parquet.read_table(p).column("stem").to_pylist()]
    assert sorted(stems) == [f"s{i:02d}" for i in range(20)]
    assert max(Path(p).stat().st_size for p in store.part_files()) <= 4 * size
    assert sorted(read_sam_cache(str(tmp_path / "cache"))) == [f"s{i:02d}" for i in range(20)]


def _sam_cache_with(tmp_path, mask_counts: list[int]) -> str:
    """A committed SAM cache whose image i holds ``mask_counts[i]`` 4×4 masks."""
    from dearli.caches.generators import MaskRecord

    uri = str(tmp_path / "sam")
    store = CacheStore(uri)
    store.open_for_writing("sam", {"kind": "test"})
    full = np.ones((4, 4), bool)
    rows = [sam_row(str(i), f"s{i}", 4, 4, [MaskRecord(full, 16, (0, 0, 4, 4), 0.9, 0.9)] * n)
            for i, n in enumerate(mask_counts)]
    store.commit(pa.Table.from_pylist(rows, schema=SAM_SCHEMA), "r1")
    return uri


def test_sam_cache_reports_images_without_masks_and_warmup_refuses_an_empty_cache(tmp_path, capsys):
    from dearli.caches.commands import _report_empty
    from dearli.caches.readers import without_masks
    from dearli.config import load_config
    from dearli.stages.warmup import run_warmup

    some = _sam_cache_with(tmp_path / "a", [2, 0, 1, 0])
    assert read_sam_cache(some).mask_counts() == {"s0": 2, "s1": 0, "s2": 1, "s3": 0}
    assert without_masks(read_sam_cache(some)) == ["s1", "s3"]
    _report_empty(some)
    assert "WARNING 2 of 4 images hold no mask (s1, s3)" in capsys.readouterr().out
    _report_empty(_sam_cache_with(tmp_path / "b", [1]))
    assert capsys.readouterr().out == ""
    empty = _sam_cache_with(tmp_path / "c", [0, 0, 0])
    # Refused before Ray starts or a run folder is made: nothing to learn from.
    with pytest.raises(DataError, match=r"none of the SAM cache's 3 images holds a mask.*cache.sam_checkpoint"):
        run_warmup(load_config("tiny"), tmp_path / "warmup", empty, echo=lambda *_: None)
    assert not (tmp_path / "warmup").exists()


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_a_kill_before_the_rename_leaves_the_old_file_and_a_rerun_cleans_up(tmp_path):
    root = tmp_path / "c"
    with killed_before_rename(), pytest.raises(Killed):  # the very first manifest write is killed
        CacheStore(str(root)).open_for_writing("sam", {"a": 1})
    assert not (root / "cache.json").exists() and len(_temporaries(root)) == 1
    with pytest.raises(DataError, match="no cache.json"):  # no cache yet, not invalid JSON
        read_sam_cache(str(root))
    store = CacheStore(str(root))
    store.open_for_writing("sam", {"a": 1})
    store.take_lease("r1")
    store.mark_success({"run_id": "r1"})
    assert _temporaries(root) == []
    before = {name: (root / name).read_text() for name in ("cache.json", "_WRITER", "_SUCCESS")}
    for write in (lambda: store.take_lease("r2"), lambda: store.mark_success({"run_id": "r2"})):
        with killed_before_rename(), pytest.raises(Killed):
            write()
    assert {name: (root / name).read_text() for name in before} == before  # the old files, whole
    assert len(_temporaries(root)) == 2 and store.holds_lease("r1") and store.has_success()
    assert read_sam_cache(str(root)).complete
    CacheStore(str(root)).open_for_writing("sam", {"a": 1})  # the rerun
    assert _temporaries(root) == [] and not (root / "_SUCCESS").exists()
    store.take_lease("r2")
    assert json.loads((root / "_WRITER").read_text()) == {"run_id": "r2"}


class Echo(CacheWorker):
    """Records {image_id, stem}; an image whose path is "bad" cannot be read."""

    schema = pa.schema([("image_id", pa.string()), ("stem", pa.string())])

    def _one(self, item: dict) -> dict:
        if item["image_path"] == "bad":
            raise DataError(item["image_path"], "cannot read this image")
        return {"image_id": item["image_id"], "stem": item["stem"]}


def _batch(*stems: str) -> dict:
    rows = [{"image_id": s, "stem": s, "image_path": "bad" if s == "bad" else "", "height": 0, "width": 0}
            for s in stems]
    return {key: np.array([row[key] for row in rows], dtype=object) for key in rows[0]}


def test_a_full_disk_stops_a_batch_instead_of_failing_its_images(tmp_path, monkeypatch):
    import errno

    import dearli.caches.store as store_module
    from dearli.caches.job import JobSummary, _Progress
    from dearli.caches.store import ERRORS_DIR
    from dearli.errors import OutputError

    store = CacheStore(str(tmp_path / "c"))
    store.open_for_writing("test", {})
    store.take_lease("r1")

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "Error writing bytes to file")

    with monkeypatch.context() as patch:
        patch.setattr(store_module.pq, "write_table", full)
        status = Echo(store.uri, "r1")(_batch("a", "bad", "b"))
    assert list(status["status"]) == ["unwritable"] * 3
    reason = status["reason"][0]
    assert "/_tmp/part-r1-" in reason and "errno 28 ENOSPC" in reason and "disk is full" in reason
    assert "\n" not in reason
    assert store.part_files() == [] and store.part_files(ERRORS_DIR) == []  # no image recorded as unreadable
    with pytest.raises(OutputError, match="errno 28 ENOSPC") as stopped:  # the driver stops on the first one
        _Progress("test", JobSummary(), 3, None).add("a", "unwritable", reason)
    assert str(stopped.value) == reason
    status = Echo(store.uri, "r1")(_batch("a", "bad", "b"))  # space again: a rerun does the batch
    assert list(status["status"]) == ["done", "failed", "done"] and store.committed_stems() == {"a", "b"}
    store.take_lease("r2")
    status = Echo(store.uri, "r1")(_batch("c"))
    assert list(status["status"]) == ["stale"] and "another run took over" in status["reason"][0]
    assert store.committed_stems() == {"a", "b"}


def test_a_large_job_goes_in_a_bounded_number_of_blocks():
    from dearli.caches.job import BLOCKS_PER_ACTOR, MAX_BLOCKS, input_blocks

    assert input_blocks(20, 8, 2) == 3  # few parts: one block each, as before
    assert input_blocks(10_000, 8, 2) == MAX_BLOCKS  # 1250 parts: the driver keeps 200 blocks, not 1250
    assert input_blocks(100_000, 8, 2) == MAX_BLOCKS
    assert input_blocks(100_000, 8, 100) == 100 * BLOCKS_PER_ACTOR  # every actor still gets several
    assert input_blocks(100, 8, 100) == 13 and input_blocks(0, 8, 1) == 1


def test_a_file_written_in_chunks_is_published_whole_locally_and_through_a_filesystem(tmp_path):
    import pyarrow.fs as pafs

    from dearli.caches.store import write_atomic

    chunks = [b"{", b'"a": 1', b"", b"}"]
    write_atomic(tmp_path / "local.json", iter(chunks))
    assert (tmp_path / "local.json").read_bytes() == b'{"a": 1}'
    remote = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())  # the non-local branch
    write_atomic("out/remote.json", iter(chunks), remote)
    assert (tmp_path / "out" / "remote.json").read_bytes() == b'{"a": 1}'
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["local.json", "out", "remote.json"]  # no temporary left
