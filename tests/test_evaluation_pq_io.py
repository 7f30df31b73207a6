"""Panoptic PNG decoding for evaluation: run maps, the fast (C extension) reader and its Pillow fallback, the
copy-free and copying Pillow decoders, pair histograms, the GT cache."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from _reference import read_panoptic_ids
from PIL import Image

from dearli.data.coco_format import id2rgb, rgb2id
from dearli.errors import DataError
from dearli.evaluation import panoptic_io, png_reader
from dearli.evaluation.panoptic_io import (
    GTRunCache,
    IdTable,
    PanopticRuns,
    joint_runs,
    pair_histogram,
    read_panoptic_runs,
    runs_from_rgb,
)
from dearli.evaluation.pq import collect_stats, pq_compute

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
    np.testing.assert_array_equal(expand(runs), rgb2id(np.asarray(Image.open(tmp_path / "a.png"))))
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
    entries = sorted(cache.glob("gt-*.runs"))
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


def test_gt_cache_survives_its_folder_being_deleted(tmp_path):
    gt_png = str(Path(fixture_files("coco")[1]) / "000000.png")
    cache = GTRunCache(tmp_path / "cache")
    shutil.rmtree(tmp_path / "cache")  # e.g. by a user cleaning up while an evaluation runs
    np.testing.assert_array_equal(expand(cache.read(gt_png)), read_panoptic_ids(gt_png))
    assert len(list((tmp_path / "cache").glob("gt-*.runs"))) == 1


def test_gt_cache_missing_png_names_the_file(tmp_path):
    with pytest.raises(DataError, match="PNG file not found") as err:
        GTRunCache(tmp_path / "cache").read(str(tmp_path / "nope.png"))
    assert err.value.path == str(tmp_path / "nope.png")


# --- the fast reader: PNGs written by hand with every filter type ----------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# the 7 passes of Adam7 interlacing: first row, first column, row step, column step
ADAM7 = [(0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1)]


@pytest.fixture
def fast_reader():
    """The fast reader must be there: CI and developers install with a C compiler (pip install -e . builds it)."""
    assert png_reader._runs is not None, "dearli.evaluation._runs is not built (pip install -e . compiles it)"
    assert png_reader.deflate is not None, "the deflate package is missing (a dependency of dearli)"


def pillow_runs(path) -> PanopticRuns:
    """read_panoptic_runs with the C extension switched off: Pillow decodes, numpy finds the runs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(png_reader, "_runs", None)
        return read_panoptic_runs(path)


def filtered_scanlines(pixels: np.ndarray, filters) -> bytes:
    """H×W×bpp uint8 bytes -> the PNG scanlines, row y filtered with type filters[y % len(filters)] (PNG spec 9.2)."""
    h, w, bpp = pixels.shape
    rows = pixels.reshape(h, w * bpp).astype(np.int32)
    out, above = [], np.zeros(w * bpp, np.int32)
    for y, row in enumerate(rows):
        kind = filters[y % len(filters)]
        left = np.concatenate((np.zeros(bpp, np.int32), row[:-bpp]))
        upper_left = np.concatenate((np.zeros(bpp, np.int32), above[:-bpp]))
        p = left + above - upper_left
        pa, pb, pc = np.abs(p - left), np.abs(p - above), np.abs(p - upper_left)
        paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, above, upper_left))
        predictor = [0, left, above, (left + above) // 2, paeth][kind]
        out.append(bytes([kind]) + ((row - predictor) % 256).astype(np.uint8).tobytes())
        above = row
    return b"".join(out)


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(pixels: np.ndarray, filters=(0,), *, interlace=False, depth=8, colour=None) -> bytes:
    """A PNG of H×W×bpp bytes (8-bit RGB/RGBA by default), one IDAT chunk; interlaced: Adam7 passes."""
    h, w, bpp = pixels.shape
    passes = [pixels[y0::dy, x0::dx] for y0, x0, dy, dx in ADAM7] if interlace else [pixels]
    data = b"".join(filtered_scanlines(p, filters) for p in passes if p.size)
    colour = {3: 2, 4: 6}[bpp] if colour is None else colour
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, int(interlace))
    return PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(data)) + chunk(b"IEND", b"")


def piecewise_pixels(rng, h: int, w: int, channels: int) -> np.ndarray:
    """Rectangles of random sizes (1 to 9 pixels a side, so runs both continue and change across rows) of a
    few colours, two of them one byte apart; random alpha noise for RGBA (alpha must not split runs)."""
    colours = rng.integers(0, 256, size=(6, 3), dtype=np.uint8)
    colours[1] = colours[0]
    colours[1, 2] ^= 1
    rows = np.repeat(np.arange(h), rng.integers(1, 10, size=h))[:h]
    cols = np.repeat(np.arange(w), rng.integers(1, 10, size=w))[:w]
    cells = rng.integers(0, len(colours), size=(rows[-1] + 1, cols[-1] + 1))
    rgb = colours[cells[rows][:, cols]]
    if channels == 3:
        return rgb
    return np.concatenate((rgb, rng.integers(0, 256, size=(h, w, 1), dtype=np.uint8)), axis=2)


SHAPES = [(1, 1, 3), (1, 9, 3), (7, 1, 3), (37, 53, 3), (9, 300, 3), (23, 17, 4), (6, 70, 4), (1, 1, 4)]


@pytest.mark.parametrize("content", ["piecewise", "noise"])
@pytest.mark.parametrize("filters", [(0,), (1,), (2,), (3,), (4,), (0, 1, 2, 3, 4), (4, 2, 1, 4, 3, 2)])
def test_fast_reader_equals_pillow_for_every_filter_type(tmp_path, fast_reader, content, filters):
    rng = np.random.default_rng(sum(filters) * 10 + len(filters) + len(content))
    for h, w, channels in SHAPES:
        if content == "noise":
            pixels = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
        else:
            pixels = piecewise_pixels(rng, h, w, channels)
        data = png_bytes(pixels, filters)
        path = tmp_path / f"{h}x{w}x{channels}.png"
        path.write_bytes(data)
        fast = panoptic_io._fast_png_runs(data)
        assert fast is not None, "the fast reader declined a plain 8-bit PNG"
        slow = pillow_runs(str(path))
        assert fast.shape == slow.shape == (h, w)
        assert fast.starts.dtype == slow.starts.dtype and fast.ids.dtype == slow.ids.dtype
        np.testing.assert_array_equal(fast.starts, slow.starts)
        np.testing.assert_array_equal(fast.ids, slow.ids)
        np.testing.assert_array_equal(expand(fast), rgb2id(pixels[..., :3]))
        read = read_panoptic_runs(str(path))
        np.testing.assert_array_equal(read.starts, fast.starts)


def split_image_data(png: bytes, parts: int) -> bytes:
    """The same PNG with its one IDAT chunk cut into ``parts`` consecutive IDAT chunks (as libpng writes them)."""
    start = png.index(b"IDAT") - 4
    length = struct.unpack_from(">I", png, start)[0]
    data = png[start + 8:start + 8 + length]
    cuts = np.linspace(0, len(data), parts + 1).astype(int)
    chunks = b"".join(chunk(b"IDAT", data[a:b]) for a, b in zip(cuts[:-1], cuts[1:]))
    return png[:start] + chunks + png[start + 12 + length:]


def test_fast_reader_takes_plain_pngs_and_leaves_the_rest_to_pillow(tmp_path, fast_reader):
    rng = np.random.default_rng(11)
    pixels = piecewise_pixels(rng, 19, 23, 3)
    plain = png_bytes(pixels, (1, 4))
    cases = {  # name -> (file, whether the fast reader decodes it)
        "image data in 3 chunks": (split_image_data(plain, 3), True),
        "text chunks before and after the image data": (
            plain[:33] + chunk(b"tEXt", b"a\0b") + plain[33:-12] + chunk(b"tEXt", b"c\0d") + chunk(b"IEND", b""),
            True),
        "interlaced": (png_bytes(pixels, (1, 4), interlace=True), False),
        # 16 bits a channel: Pillow keeps the high bytes (the decoding evaluation always had)
        "16-bit": (png_bytes(np.repeat(pixels, 2, axis=2), depth=16, colour=2), False),
    }
    for name, (data, fast_takes_it) in cases.items():
        path = tmp_path / f"{name}.png"
        path.write_bytes(data)
        expected = pillow_runs(str(path))
        np.testing.assert_array_equal(expand(expected), rgb2id(pixels), err_msg=name)
        runs = read_panoptic_runs(str(path))
        np.testing.assert_array_equal(runs.starts, expected.starts, err_msg=name)
        np.testing.assert_array_equal(runs.ids, expected.ids, err_msg=name)
        assert (panoptic_io._fast_png_runs(data) is not None) == fast_takes_it, name
    for mode in ("P", "L", "LA"):
        Image.new(mode, (4, 3)).save(tmp_path / f"{mode}.png")
        with pytest.raises(DataError, match=f"expected an RGB panoptic PNG, got image mode '{mode}'") as err:
            read_panoptic_runs(str(tmp_path / f"{mode}.png"))
        assert err.value.path == str(tmp_path / f"{mode}.png")


def damaged_pngs(good: bytes, pixels: np.ndarray) -> dict[str, tuple[bytes, bool]]:
    """Ways a PNG file can be broken: name -> (the bytes of the file, whether Pillow refuses it)."""
    idat = good.index(b"IDAT")
    bad_data = bytearray(good)
    bad_data[idat + 10] ^= 0xFF  # inside the zlib stream
    bad_crc = bytearray(good)
    bad_crc[29] ^= 1  # the IHDR checksum
    scanlines = bytearray(filtered_scanlines(pixels, (0,)))
    scanlines[1 + pixels.shape[1] * 3] = 5  # the filter type byte of row 1
    header = good[:idat - 4]
    bad_filter = header + chunk(b"IDAT", zlib.compress(bytes(scanlines))) + chunk(b"IEND", b"")
    short = header + chunk(b"IDAT", zlib.compress(filtered_scanlines(pixels[:-1], (0,)))) + chunk(b"IEND", b"")
    cases = {f"truncated at {n}": (good[:n], True) for n in (0, 8, 20, 33, idat + 20, len(good) - 30)}
    cases.update({"corrupt image data": (bytes(bad_data), True), "bad header checksum": (bytes(bad_crc), True),
                  "bad filter type": (bad_filter, True)})
    # accepted by Pillow, so by evaluation as before: no IEND chunk, a missing last row (left black), other formats
    cases.update({"no end chunk": (good[:-12], False), "one row short": (short, False),
                  "not a PNG": (b"P3\n1 1 255\n0 0 0\n", False)})
    return cases


def outcome(read, path: str) -> tuple:
    """What reading gives: ("runs", starts, ids) or ("error", message) of a DataError that names the file."""
    try:
        runs = read(path)
    except DataError as err:
        assert err.path == path
        return ("error", str(err))
    return ("runs", runs.starts.tolist(), runs.ids.tolist())


def test_damaged_pngs_give_the_same_errors_as_pillow_naming_the_file(tmp_path, fast_reader):
    pixels = piecewise_pixels(np.random.default_rng(2), 30, 40, 3)
    good = png_bytes(pixels, (4, 1, 2))
    for name, (data, refused) in damaged_pngs(good, pixels).items():
        path = str(tmp_path / f"{name}.png")
        Path(path).write_bytes(data)
        fast, slow = outcome(read_panoptic_runs, path), outcome(pillow_runs, path)
        assert fast == slow, name
        assert fast[0] == ("error" if refused else "runs"), (name, fast[:2])
    missing = str(tmp_path / "missing.png")
    assert outcome(read_panoptic_runs, missing) == outcome(pillow_runs, missing) == (
        "error", f"{missing}: PNG file not found")


def test_png_runs_rejects_what_is_not_png_image_data(fast_reader):
    runs = png_reader._runs
    rows = bytes([0, 1, 2, 3, 4, 5, 6]) * 2  # 2 rows of 2 RGB pixels, filter type 0
    starts, ids = runs.png_runs(rows, 2, 2, 3)
    assert np.frombuffer(starts, np.int64).tolist() == [0, 1, 2, 3]
    assert np.frombuffer(ids, np.uint32).tolist() == [0x030201, 0x060504, 0x030201, 0x060504]
    with pytest.raises(ValueError, match="image data has 13 bytes, expected 14"):
        runs.png_runs(rows[:-1], 2, 2, 3)
    with pytest.raises(ValueError, match="unknown filter type 9 in row 1"):
        runs.png_runs(rows[:7] + b"\x09" + rows[8:], 2, 2, 3)
    for width, height, bpp in ((2, 2, 2), (0, 2, 3), (2, 0, 3), (2**62, 2**62, 3)):
        with pytest.raises(ValueError, match="width and height must be positive and bpp 3 or 4"):
            runs.png_runs(rows, width, height, bpp)


# --- pair histograms and whole evaluations with and without the extension ---------------------------------------


def random_runs(rng, size: int, ids: np.ndarray) -> PanopticRuns:
    """A 1×size run map with up to 30 random run starts, each run with a random id of ``ids``."""
    cuts = rng.permutation(np.arange(1, size))[:rng.integers(0, min(size, 30))]
    starts = np.concatenate(([0], np.sort(cuts))).astype(np.int64)
    return PanopticRuns((1, size), starts, rng.choice(ids, size=len(starts)).astype(np.uint32))


def test_pair_histogram_in_c_equals_numpy_and_counts_every_pixel(fast_reader, monkeypatch):
    rng = np.random.default_rng(4)
    a_table, b_table = IdTable(np.array([0, 5, 70000, 2**24 - 1])), IdTable(np.array([3, 9, 256]))
    for size, b_ids in ((1, [3]), (2, [3, 9]), (7, [3, 9, 256, 4]), (100, [9, 256]), (100, [1, 2, 3]),
                        (1000, [3, 9, 256, 0, 2**24 - 1])):
        a = random_runs(rng, size, np.array([0, 5, 70000, 2**24 - 1, 6, 1]))  # ids 6 and 1: the "other" slot
        b = random_runs(rng, size, np.array(b_ids))
        if size == 7:  # both maps split at the same pixels
            b = PanopticRuns(a.shape, a.starts, rng.choice(np.array(b_ids, np.uint32), size=len(a.starts)))
        hist, b_known = pair_histogram(a, a_table, b, b_table)
        per_pixel = np.zeros((5, 4), np.int64)
        np.add.at(per_pixel, (a_table.lookup(expand(a))[0], b_table.lookup(expand(b))[0]), 1)
        np.testing.assert_array_equal(hist, per_pixel)
        assert hist.dtype == np.int64 and b_known == (set(b.ids.tolist()) <= {3, 9, 256})
        with monkeypatch.context() as mp:
            mp.setattr(png_reader, "_runs", None)
            slow, slow_known = pair_histogram(a, a_table, b, b_table)
        assert slow.dtype == np.int64 and slow_known == b_known
        np.testing.assert_array_equal(hist, slow)
    a = random_runs(rng, 50, np.array([0, 5]))
    for starts, table in (([1, 5], [3]), ([0, 5, 5], [3]), ([0, 50], [3]), ([0, 5], [9, 3]), ([0, 5], [3, 3])):
        bad = PanopticRuns((1, 50), np.array(starts, np.int64), np.zeros(len(starts), np.uint32))
        with pytest.raises(ValueError, match="malformed run maps or id tables"):
            pair_histogram(a, a_table, bad, IdTable(np.array(table)))


@pytest.mark.parametrize("name", ["coco", "ade"])
def test_evaluation_is_identical_without_the_extension(fast_reader, monkeypatch, name):
    files = fixture_files(name)
    semseg_index = {cat["id"]: k for k, cat in enumerate(json.loads(Path(files[0]).read_text())["categories"])}
    n_pngs = 2 * len(list(Path(files[1]).glob("*.png")))
    pillow_opens = []  # the PNG files Pillow decodes (preload_decoder's in-memory PNG left out)
    open_png = panoptic_io._open_png
    monkeypatch.setattr(panoptic_io, "_open_png",
                        lambda path: (isinstance(path, str) and pillow_opens.append(path)) or open_png(path))
    results = {}
    # all of the extension; none of it (Pillow and numpy); the extension without deflate (Pillow decodes)
    for switched_off in (None, "_runs", "deflate"):
        pillow_opens.clear()
        with monkeypatch.context() as mp:
            if switched_off:
                mp.setattr(png_reader, switched_off, None)
            results[switched_off] = collect_stats(*files, workers=2, progress=False, semseg_index=semseg_index)
        assert len(pillow_opens) == (0 if switched_off is None else n_pngs), switched_off
    stats, conf = results[None]
    assert conf.sum() > 0 and stats.tp.sum() > 0 and stats.fp.sum() > 0
    for other_stats, other_conf in (results["_runs"], results["deflate"]):
        for key in ("iou", "tp", "fp", "fn"):
            np.testing.assert_array_equal(getattr(other_stats, key), getattr(stats, key))
        np.testing.assert_array_equal(other_conf, conf)
