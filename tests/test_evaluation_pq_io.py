"""Panoptic PNG decoding for evaluation: run maps, the copy-free and copying decoders, the GT cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dearli.data.coco_format import id2rgb, rgb2id
from dearli.errors import DataError
from dearli.evaluation.panoptic_io import (
    GTRunCache,
    PanopticRuns,
    joint_runs,
    read_panoptic_ids,
    read_panoptic_runs,
    runs_from_rgb,
)
from dearli.evaluation.pq import pq_compute

FIXTURES = Path(__file__).parent / "fixtures" / "pq"


def fixture_files(name: str) -> tuple[str, str, str, str]:
    root = FIXTURES / name
    return str(root / "gt.json"), str(root / "gt"), str(root / "pred.json"), str(root / "pred")


def assert_close(ours, expected, tol=1e-12):
    if isinstance(expected, dict):
        assert set(ours) == set(expected)
        for key, value in expected.items():
            assert_close(ours[key], value, tol)
    else:
        assert abs(ours - expected) <= tol


def expand(runs: PanopticRuns) -> np.ndarray:
    """The H×W id map a run map stands for."""
    lengths = np.diff(runs.starts, append=runs.shape[0] * runs.shape[1])
    return np.repeat(runs.ids, lengths).reshape(runs.shape)


def blocky_ids(rng, h, w, n_ids=40) -> np.ndarray:
    """A piecewise-constant id map with random 24-bit ids, some differing from a neighbour in one byte only."""
    ids = rng.choice(256**3, size=n_ids, replace=False)
    ids[1] = ids[0] ^ 0x010000  # differs in the blue byte only
    ids[2] = ids[0] ^ 0x000001  # red byte only
    lab = rng.integers(0, n_ids, size=(h // 4 + 1, w // 7 + 1)).repeat(4, 0).repeat(7, 1)[:h, :w]
    return ids[lab]


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (7, 1), (37, 53)])
def test_runs_reproduce_the_pixel_ids(tmp_path, shape):
    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    ids = blocky_ids(rng, *shape)
    Image.fromarray(id2rgb(ids)).save(tmp_path / "a.png")
    runs = read_panoptic_runs(str(tmp_path / "a.png"))
    assert runs.shape == shape and runs.starts[0] == 0 and np.all(np.diff(runs.starts) > 0)
    np.testing.assert_array_equal(expand(runs), ids)
    # ids are those of panopticapi's decoding: rgb2id of the PNG's colours
    reference = rgb2id(np.asarray(Image.open(tmp_path / "a.png")))
    np.testing.assert_array_equal(read_panoptic_ids(str(tmp_path / "a.png")), reference)
    # neighbouring equal pixels never start a run: the run map is minimal
    flat = ids.reshape(-1)
    assert len(runs.starts) == 1 + int((flat[1:] != flat[:-1]).sum())


def test_copy_free_and_copying_decoders_agree(tmp_path, monkeypatch):
    from dearli.evaluation import panoptic_io

    rng = np.random.default_rng(5)
    ids = blocky_ids(rng, 45, 61)
    Image.fromarray(id2rgb(ids)).save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as im:
        im.load()
        copy_free = panoptic_io._pixel_words(im) is not None
    fast = read_panoptic_runs(str(tmp_path / "a.png"))
    monkeypatch.setattr(panoptic_io, "_pixel_words", lambda im: None)
    slow = read_panoptic_runs(str(tmp_path / "a.png"))
    for runs in (fast, slow):
        np.testing.assert_array_equal(expand(runs), ids)
    np.testing.assert_array_equal(fast.starts, slow.starts)
    np.testing.assert_array_equal(fast.ids, slow.ids)
    if not hasattr(Image.Image, "__arrow_c_array__"):
        pytest.skip("this Pillow has no Arrow export: only the copying decoder was checked")
    assert copy_free


def test_joint_runs_count_every_pixel_pair():
    rng = np.random.default_rng(3)
    g, p = blocky_ids(rng, 30, 41), blocky_ids(rng, 30, 41, n_ids=7)
    g_ids, p_ids, lengths = joint_runs(runs_from_rgb(id2rgb(g)), runs_from_rgb(id2rgb(p)))
    got = {}
    for a, b, n in zip(g_ids.tolist(), p_ids.tolist(), lengths.tolist()):
        got[(a, b)] = got.get((a, b), 0) + n
    pairs, counts = np.unique(np.stack([g.reshape(-1), p.reshape(-1)]), axis=1, return_counts=True)
    assert got == {(int(a), int(b)): int(n) for (a, b), n in zip(pairs.T, counts)}


def test_gt_cache_gives_the_same_result_and_follows_file_changes(tmp_path):
    gt_json, gt_dir, pred_json, pred_dir = fixture_files("coco")
    cache = tmp_path / "cache"
    cold = pq_compute(gt_json, gt_dir, pred_json, pred_dir, workers=1, progress=False)
    filled = pq_compute(gt_json, gt_dir, pred_json, pred_dir, workers=1, progress=False, gt_cache_dir=cache)
    entries = sorted(cache.glob("gt-*.npy"))
    assert len(entries) == len(list(Path(gt_dir).glob("*.png")))
    warm = pq_compute(gt_json, gt_dir, pred_json, pred_dir, workers=2, progress=False, gt_cache_dir=cache)
    assert sorted(cache.glob("*")) == entries  # nothing decoded or written again
    assert filled == cold
    assert_close(warm, cold)  # 2 workers: only the summation order differs

    # a damaged entry is decoded again and rewritten
    entries[0].write_bytes(b"garbage")
    assert pq_compute(gt_json, gt_dir, pred_json, pred_dir, workers=1, progress=False, gt_cache_dir=cache) == cold
    assert entries[0].stat().st_size > 100

    # a GT file replaced by another picture is not served from its old entry
    src = Path(gt_dir) / "000000.png"
    copy = tmp_path / "gt"
    copy.mkdir()
    for f in Path(gt_dir).glob("*.png"):
        (copy / f.name).write_bytes(f.read_bytes())
    ids = read_panoptic_ids(str(src))
    table = GTRunCache(cache)
    np.testing.assert_array_equal(expand(table.read(str(copy / "000000.png"))), ids)
    changed = ids.copy()
    changed[:3, :3] = 0
    Image.fromarray(id2rgb(changed)).save(copy / "000000.png")
    np.testing.assert_array_equal(expand(table.read(str(copy / "000000.png"))), changed)


def test_gt_cache_missing_png_names_the_file(tmp_path):
    with pytest.raises(DataError, match="PNG file not found") as err:
        GTRunCache(tmp_path / "cache").read(str(tmp_path / "nope.png"))
    assert err.value.path == str(tmp_path / "nope.png")
