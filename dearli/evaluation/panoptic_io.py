"""Reading COCO panoptic annotation sets for evaluation: JSON files, PNG files, segment-id tables.

The validation here follows what cocodataset/panopticapi accepts and rejects, so that a
prediction set that evaluates here also evaluates there, with every error naming its file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from dearli.data.coco_format import VOID_ID
from dearli.errors import DataError
from dearli.evaluation import png_reader

_ID_MASK = np.uint32(0xFFFFFF)  # a panoptic id has 24 bits: R + 256·G + 256²·B
_NOT_AN_ID = np.uint32(0xFFFFFFFF)  # never equal to a 24-bit id: stands after the last id of an IdTable


@dataclass(frozen=True)
class ImageTask:
    """One GT/prediction pair to evaluate (plain data, so it pickles cheaply to worker processes)."""

    image_id: Any
    gt_png: str
    gt_segments: list[dict]
    pred_png: str
    pred_segments: list[dict]


def load_json(source: str | Path | Mapping, what: str) -> tuple[dict, str | None]:
    """Load a COCO panoptic JSON given as a path or an already-parsed dict.

    Returns:
        (the dict, the path as a string or None when a dict was given).
    """
    if isinstance(source, Mapping):
        return dict(source), None
    path = str(source)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(path, f"{what} JSON file not found") from None
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(path, f"cannot read {what} JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataError(path, f"{what} JSON has no 'annotations' list")
    return data, path


def load_categories(gt: dict, gt_path: str | None) -> list[dict]:
    """The GT ``categories`` list, checked for the fields evaluation needs (``id``, ``isthing``)."""
    categories = gt.get("categories")
    if not isinstance(categories, list) or not categories:
        raise DataError(gt_path, "ground-truth JSON has no 'categories' list")
    for cat in categories:
        if not isinstance(cat, dict) or "id" not in cat:
            raise DataError(gt_path, f"category without an 'id': {cat!r}")
        if "isthing" not in cat:
            raise DataError(gt_path, f"category {cat['id']!r} has no 'isthing' field")
    return categories


def pair_annotations(
    gt: dict, gt_path: str | None, gt_dir: str | Path, pred: dict, pred_path: str | None, pred_dir: str | Path
) -> list[ImageTask]:
    """One task per GT annotation, in GT order, with the prediction of the same ``image_id``.

    Image ids are compared as they are (``1`` and ``"1"`` differ), as panopticapi does.
    """
    preds = {}
    for ann in pred["annotations"]:
        _check_annotation(ann, pred_path)
        preds[ann["image_id"]] = ann  # a repeated image id: the last annotation wins, as in panopticapi
    tasks = []
    for ann in gt["annotations"]:
        _check_annotation(ann, gt_path, need_area=True)
        image_id = ann["image_id"]
        if image_id not in preds:
            raise DataError(pred_path, f"no prediction for the image with id {image_id!r}")
        pred_ann = preds[image_id]
        tasks.append(ImageTask(
            image_id=image_id,
            gt_png=os.path.join(gt_dir, ann["file_name"]),
            gt_segments=ann["segments_info"],
            pred_png=os.path.join(pred_dir, pred_ann["file_name"]),
            pred_segments=pred_ann["segments_info"],
        ))
    return tasks


def _check_annotation(ann: Any, path: str | None, need_area: bool = False) -> None:
    if not isinstance(ann, dict):
        raise DataError(path, f"annotation is not an object: {ann!r:.80}")
    for key in ("image_id", "file_name", "segments_info"):
        if key not in ann:
            raise DataError(path, f"annotation of image {ann.get('image_id')!r} has no '{key}'")
    for seg in ann["segments_info"]:
        if not isinstance(seg, dict) or "id" not in seg or "category_id" not in seg:
            raise DataError(path, f"image {ann['image_id']!r}: segment without 'id'/'category_id': {seg!r:.80}")
        if need_area and "area" not in seg:  # GT areas are taken from the JSON, not counted
            raise DataError(path, f"image {ann['image_id']!r}: segment {seg['id']!r} has no 'area'")


@contextlib.contextmanager
def _open_png(path: str) -> Iterator[Image.Image]:
    """The decoded RGB or RGBA image of a panoptic PNG, with read errors naming the file."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("RGB", "RGBA"):
                raise DataError(path, f"expected an RGB panoptic PNG, got image mode {im.mode!r}")
            im.load()
            yield im
    except FileNotFoundError:
        raise DataError(path, "PNG file not found") from None
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(path, f"cannot read PNG: {err}") from None


def _rgb_of(im: Image.Image) -> np.ndarray:
    if im.mode == "RGB":
        # plain RGB export is a fast copy; Pillow's RGBX packing costs several times more
        return np.frombuffer(im.tobytes(), dtype=np.uint8).reshape(im.height, im.width, 3)
    return np.ascontiguousarray(np.asarray(im)[..., :3])


def _pixel_words(im: Image.Image) -> np.ndarray | None:
    """The loaded RGB image's own memory as H·W uint32 words R + 2⁸G + 2¹⁶B + 2²⁴·pad, without a copy.

    Pillow stores RGB as 4 bytes a pixel and exports that memory through the Arrow C interface
    (Pillow ≥ 11.2); copying it out with ``tobytes`` costs about half as much as decoding the PNG.
    Returns None when the export is unavailable (older Pillow, no pyarrow, memory in several blocks).
    """
    if not hasattr(im, "__arrow_c_array__"):
        return None
    try:
        import pyarrow as pa

        pixels = pa.array(im)  # H·W fixed-size lists of 4 bytes over Pillow's memory
        values = pixels.values
        if pixels.offset or values.type != pa.uint8() or len(values) != 4 * im.width * im.height:
            return None
        # the raw buffer, not values.to_numpy(): that first call imports ~0.3 s of pyarrow modules
        data = np.frombuffer(values.buffers()[1], dtype=np.uint8, count=len(values), offset=values.offset)
    except (ImportError, ValueError, TypeError, AttributeError, NotImplementedError):
        return None
    return data.view("<u4")


def preload_decoder() -> None:
    """Decode a tiny PNG, so that everything decoding imports lazily is loaded before worker threads start.

    Pillow's PNG plugin and pyarrow take ~0.1 s to import; they are needed only when the fast reader
    (see :func:`_fast_png_runs`) is missing, so they are loaded only then.
    """
    buf = io.BytesIO()
    Image.new("RGB", (2, 1)).save(buf, format="PNG")
    if _fast_png_runs(buf.getvalue()) is None:
        buf.seek(0)
        read_panoptic_runs(buf)


def _rgb_to_ids(rgb: np.ndarray) -> np.ndarray:
    """...×3 uint8 colours -> ... uint32 ids."""
    ids = rgb[..., 2].astype(np.uint32) << 16
    ids |= rgb[..., 1].astype(np.uint32) << 8
    ids |= rgb[..., 0]
    return ids


@dataclass(frozen=True)
class PanopticRuns:
    """A panoptic id map as runs of equal ids along the row-major pixel order.

    Panoptic maps are piecewise constant, so an image of ~350k pixels has only a few thousand runs;
    counting (GT id, prediction id) pairs over runs instead of pixels makes evaluation cost little
    more than decoding the PNGs. Runs may continue across row ends (only pair counts matter).

    Attributes:
        shape: (H, W).
        starts: M int64, first pixel of each run, increasing, ``starts[0] == 0``.
        ids: M uint32, the segment id of each run.
    """

    shape: tuple[int, int]
    starts: np.ndarray
    ids: np.ndarray


def runs_from_rgb(rgb: np.ndarray) -> PanopticRuns:
    """Runs of an H×W×3 uint8 panoptic image (see :class:`PanopticRuns`)."""
    h, w = rgb.shape[:2]
    flat = np.ascontiguousarray(rgb).reshape(-1)
    # a byte differing from the same byte of the previous pixel starts a run at that pixel; the
    # byte-wise compare avoids building the H×W id map, the costliest step after PNG decoding
    changed = np.flatnonzero(flat[3:] != flat[:-3]) // 3 + 1
    if changed.size:
        changed = changed[np.concatenate(([True], changed[1:] != changed[:-1]))]  # ≤ 3 hits per pixel
    starts = np.concatenate(([0], changed)).astype(np.int64)
    return PanopticRuns((h, w), starts, _rgb_to_ids(flat.reshape(-1, 3)[starts]))


def _fast_png_runs(data: bytes) -> PanopticRuns | None:
    """:func:`png_reader.png_runs` of a PNG's bytes as :class:`PanopticRuns` (None: Pillow decodes it)."""
    found = png_reader.png_runs(data)
    return None if found is None else PanopticRuns(*found)


def _read_fast(path: str) -> PanopticRuns | None:
    """:func:`png_reader.read_runs` of a file as :class:`PanopticRuns` (None: Pillow decodes it)."""
    found = png_reader.read_runs(path)
    return None if found is None else PanopticRuns(*found)


def read_panoptic_runs(path: str) -> PanopticRuns:
    """Decode a panoptic PNG into runs (see :class:`PanopticRuns`); ``path`` may also be a binary file object."""
    runs = _read_fast(path)
    if runs is not None:
        return runs
    with _open_png(path) as im:
        words = _pixel_words(im) if im.mode == "RGB" else None
        if words is None:
            return runs_from_rgb(_rgb_of(im))
        # runs are found on whole words: a pad byte that varied would only split runs, never merge them
        change = np.empty(len(words), dtype=bool)
        change[0] = True
        np.not_equal(words[1:], words[:-1], out=change[1:])
        starts = np.flatnonzero(change).astype(np.int64, copy=False)
        return PanopticRuns((im.height, im.width), starts, words[starts] & _ID_MASK)


def joint_runs(a: PanopticRuns, b: PanopticRuns) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split two same-size run maps at every boundary of either.

    Returns:
        (ids of ``a``, ids of ``b``, pixel count) of each joint run: three arrays of length M'.
    """
    starts = np.concatenate((a.starts, b.starts))
    # two sorted halves: a stable sort merges them in linear time; counting the entries of ``a`` before each
    # position gives the run of ``a`` a joint run lies in, without a binary search per joint run
    order = np.argsort(starts, kind="stable")
    starts = starts[order]
    in_a = np.cumsum(order < len(a.starts))
    in_b = np.arange(1, len(starts) + 1) - in_a
    last = np.empty(len(starts), dtype=bool)  # a start found in both maps counts once, after both entries
    np.not_equal(starts[1:], starts[:-1], out=last[:-1])
    last[-1] = True
    starts = starts[last]
    lengths = np.diff(starts, append=a.shape[0] * a.shape[1])
    return a.ids[in_a[last] - 1], b.ids[in_b[last] - 1], lengths


class IdTable:
    """Maps segment ids to compact slots 0..n (slot n = "any other id").

    Args:
        ids: n sorted unique uint32 ids.
    """

    def __init__(self, ids: np.ndarray):
        self.ids = np.ascontiguousarray(ids, dtype=np.uint32)
        self.other = len(self.ids)
        self._stored = np.append(self.ids, _NOT_AN_ID)

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slots of ``ids`` (any shape, uint32; meant for run ids, a few thousand values).

        Returns:
            (flat intp slots with unknown ids set to ``self.other``, flat bool "id is known").
        """
        flat = np.asarray(ids, dtype=np.uint32).reshape(-1)
        slots = np.searchsorted(self.ids, flat)
        known = self._stored[slots] == flat
        slots[~known] = self.other
        return slots, known


def pair_histogram(a: PanopticRuns, a_table: IdTable, b: PanopticRuns, b_table: IdTable) -> tuple[np.ndarray, bool]:
    """Pixel counts of (slot of ``a``, slot of ``b``) pairs of two same-size run maps (see :class:`IdTable`).

    Returns:
        (R×C int64 counts with R = ``a_table.other + 1``, C = ``b_table.other + 1``; whether every id of
        ``b`` is in ``b_table``).
    """
    if png_reader._runs is not None:
        counts, absent = png_reader._runs.pair_histogram(
            np.ascontiguousarray(a.starts, dtype=np.int64), np.ascontiguousarray(a.ids, dtype=np.uint32), a_table.ids,
            np.ascontiguousarray(b.starts, dtype=np.int64), np.ascontiguousarray(b.ids, dtype=np.uint32), b_table.ids,
            a.shape[0] * a.shape[1])
        return np.frombuffer(counts, dtype=np.int64).reshape(a_table.other + 1, b_table.other + 1), absent == 0
    a_slots, _ = a_table.lookup(a.ids)
    b_slots, b_known = b_table.lookup(b.ids)
    ja, jb, lengths = joint_runs(PanopticRuns(a.shape, a.starts, a_slots), PanopticRuns(b.shape, b.starts, b_slots))
    rows, cols = a_table.other + 1, b_table.other + 1
    # float weights are exact here (counts < 2**53) and bincount beats np.add.at several times over
    hist = np.bincount(ja * cols + jb, weights=lengths, minlength=rows * cols)
    return hist.astype(np.int64).reshape(rows, cols), bool(b_known.all())


class GTRunCache:
    """Decoded ground-truth run maps kept on disk across evaluations (e.g. every epoch of a training run).

    Entries are keyed by the PNG's resolved path, modification time and size, so an edited or replaced
    file is decoded again. Stale entries are never read; the folder may be deleted at any time.

    Args:
        folder: cache folder (created when missing); only ``gt-*.runs`` files named by this class are written.
    """

    # an entry is little-endian int64: version, H, W, M, then M run starts and M run ids (read without the
    # header parsing of np.load, which costs several times the reading)
    _VERSION = 2

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DataError(str(folder), f"cannot create the ground-truth cache folder: {err}") from None

    def read(self, path: str) -> PanopticRuns:
        """The runs of the PNG at ``path``, from the cache or decoded (and then stored)."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DataError(path, "PNG file not found") from None
        key = f"{os.path.realpath(path)}\0{st.st_mtime_ns}\0{st.st_size}"
        entry = self.folder / f"gt-{hashlib.sha1(key.encode()).hexdigest()}.runs"
        runs = self._load(entry)
        if runs is None:
            runs = read_panoptic_runs(path)
            self._store(entry, runs)
        return runs

    def _load(self, entry: Path) -> PanopticRuns | None:
        try:
            data = np.frombuffer(entry.read_bytes(), dtype="<i8")
        except (OSError, ValueError):  # missing, or damaged by an interrupted writer: decode again
            return None
        if data.size < 4 or data[0] != self._VERSION or data.size != 4 + 2 * data[3]:
            return None
        m = int(data[3])
        return PanopticRuns((int(data[1]), int(data[2])), data[4:4 + m].astype(np.int64),
                            data[4 + m:].astype(np.uint32))

    def _store(self, entry: Path, runs: PanopticRuns) -> None:
        header = [self._VERSION, *runs.shape, len(runs.starts)]
        data = np.concatenate((header, runs.starts, runs.ids)).astype("<i8")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)  # it may have been deleted since __init__
            fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        except OSError:  # not writable (any more): the entry is simply not kept
            return
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data.tobytes())
            os.replace(tmp, entry)  # atomic: concurrent workers never see a half-written entry
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def segment_table(segments: list[dict], path: str | None) -> tuple[dict, IdTable, int]:
    """Segments keyed by id (a repeated id: the last one wins, as in panopticapi) and their id table.

    The table always holds VOID (0) so VOID pixels get a slot of their own.

    Returns:
        (id -> segment dict, table over sorted ids incl. 0, slot of VOID).
    """
    by_id = {}
    for seg in segments:
        seg_id = seg["id"]
        if not isinstance(seg_id, (int, np.integer)) or isinstance(seg_id, bool) or not 0 <= seg_id <= _ID_MASK:
            raise DataError(path, f"segment id {seg_id!r} is not an integer in [0, 256**3)")
        by_id[int(seg_id)] = seg
    ids = np.array(sorted(set(by_id) | {VOID_ID}), dtype=np.uint32)
    return by_id, IdTable(ids), int(np.searchsorted(ids, VOID_ID))
