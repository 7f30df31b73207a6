"""Panoptic quality (PQ, SQ, RQ) with the exact rules of cocodataset/panopticapi ``pq_compute``.

Rules (per image, then summed over the data set per category):

* A GT segment and a predicted segment match when they have the same category, the GT segment
  is not crowd, and IoU > 0.5 (strictly), where the union leaves out the prediction's pixels on
  VOID: ``union = pred_area + gt_area - intersection - |pred ∩ VOID|``.
* GT areas come from the JSON ``area`` field (ADE20K's exceed the PNG pixel counts); prediction
  areas are counted in the PNG (their JSON ``area`` is ignored).
* Unmatched non-crowd GT segments are false negatives. An unmatched prediction is a false positive
  unless more than half of it lies on VOID or on the (last listed) crowd segment of its category.
* GT ids absent from the GT JSON are neither VOID nor segments: they are simply never matched.
* Per class ``pq = Σiou / (tp + fp/2 + fn/2)``, ``sq = Σiou / tp``, ``rq = tp / (tp + fp/2 + fn/2)``;
  classes with no tp, fp or fn are left out of the means. All values are fractions in [0, 1].

One deliberate difference: a group (Things or Stuff) with no counted class reports pq = sq = rq = 0
and n = 0 where panopticapi divides by zero.

The per-image work is a joint histogram of (GT slot, prediction slot) pixel pairs. Each PNG is
reduced to runs of equal ids while it is decoded (no per-pixel id map), the run ids are looked up
in the segment tables, and a merge of the two run maps gives the histogram; everything after that
is on tiny matrices. Decoding is done by dearli's C extension after libdeflate's inflate (see
``png_reader.png_runs``), without the GIL, or by Pillow where the extension is missing or a
file is not a plain 8-bit RGB(A) PNG (same runs, same errors). Images are spread over a thread pool
(no worker start-up, nothing pickled), and decoded GT maps can be kept in a cache folder for
repeated evaluation of the same ground truth.
"""

from __future__ import annotations

import collections
import itertools
import os
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dearli.errors import DataError
from dearli.evaluation.panoptic_io import (
    GTRunCache,
    IdTable,
    ImageTask,
    load_categories,
    load_json,
    pair_annotations,
    pair_histogram,
    preload_decoder,
    read_panoptic_runs,
    segment_table,
)

MATCH_IOU = 0.5  # a match needs IoU strictly above this
IGNORED_FRACTION = 0.5  # an unmatched prediction is ignored when more than this lies on VOID/crowd
_MAX_DEFAULT_WORKERS = 8  # image decoding runs without the GIL, the rest (~1/4 of the work) holds it
_CHUNK_IMAGES = 4  # images summed by one thread task: fixed, so sums never depend on the thread count
_AHEAD = 4  # chunks per thread submitted ahead of the one being consumed


@dataclass
class PQStats:
    """Per-category sums over images; arrays are aligned with ``categories`` (GT JSON order)."""

    categories: list[dict]
    iou: np.ndarray = field(default=None)  # C float64: sum of IoUs of matches
    tp: np.ndarray = field(default=None)  # C int64
    fp: np.ndarray = field(default=None)  # C int64
    fn: np.ndarray = field(default=None)  # C int64

    def __post_init__(self):
        c = len(self.categories)
        for name, dtype in (("iou", np.float64), ("tp", np.int64), ("fp", np.int64), ("fn", np.int64)):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(c, dtype=dtype))

    def add(self, counts: np.ndarray) -> None:
        """Add a 4×C' array (iou, tp, fp, fn; C' ≥ C, extra columns = unknown GT categories, dropped)."""
        c = len(self.categories)
        self.iou += counts[0, :c]
        self.tp += counts[1, :c].astype(np.int64)
        self.fp += counts[2, :c].astype(np.int64)
        self.fn += counts[3, :c].astype(np.int64)


def pq_from_stats(stats: PQStats) -> dict:
    """Average per-class PQ/SQ/RQ into ``{"All", "Things", "Stuff": {pq, sq, rq, n}, "per_class"}``.

    ``per_class`` is keyed by category id (as in the GT JSON) and lists every category, with zeros
    for those that never occur, as panopticapi does.
    """
    per_class = {}
    counted = []  # (category index, is thing) of classes with tp + fp + fn > 0, in GT order
    for i, cat in enumerate(stats.categories):
        tp, fp, fn, iou = int(stats.tp[i]), int(stats.fp[i]), int(stats.fn[i]), float(stats.iou[i])
        if tp + fp + fn == 0:
            per_class[cat["id"]] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
            continue
        denom = tp + 0.5 * fp + 0.5 * fn
        per_class[cat["id"]] = {"pq": iou / denom, "sq": iou / tp if tp else 0.0, "rq": tp / denom}
        counted.append((cat["id"], cat["isthing"] == 1))
    results = {}
    for name, want in (("All", None), ("Things", True), ("Stuff", False)):
        ids = [cid for cid, isthing in counted if want is None or isthing == want]
        n = len(ids)
        sums = {k: sum(per_class[cid][k] for cid in ids) for k in ("pq", "sq", "rq")}
        results[name] = {k: (v / n if n else 0.0) for k, v in sums.items()} | {"n": n}
    results["per_class"] = per_class
    return results


@dataclass(frozen=True)
class _Context:
    """What every image needs besides its own files (shared read-only by the worker threads)."""

    cat_index: dict  # category id -> position in the GT categories list
    pred_json: str | None
    semseg_index: dict | None  # category id -> contiguous class, or None when semseg is off
    gt_cache: GTRunCache | None = None  # decoded GT run maps kept in a folder, or None to decode every time


def _image_counts(task: ImageTask, ctx: _Context) -> tuple[np.ndarray, np.ndarray | None]:
    """PQ counts of one image (4×(C+1): iou, tp, fp, fn) and, optionally, its semantic confusion."""
    gt_segs, gt_table, gt_void = segment_table(task.gt_segments, task.gt_png)
    pred_segs, pred_table, pred_void = segment_table(task.pred_segments, ctx.pred_json)
    unknown_cat = len(ctx.cat_index)
    for seg_id, seg in pred_segs.items():
        if seg["category_id"] not in ctx.cat_index:
            raise DataError(ctx.pred_json, f"image {task.image_id!r}: segment {seg_id} has unknown "
                            f"category_id {seg['category_id']!r}")
    hist = _pair_histogram(task, ctx, gt_table, pred_table)  # pixels per (GT slot, pred slot)

    p_area = hist.sum(axis=0)
    pred_slot_ids = pred_table.ids.tolist()
    missing = [i for s, i in enumerate(pred_slot_ids) if i in pred_segs and p_area[s] == 0]
    if missing:
        raise DataError(task.pred_png, f"segment ids {missing[:10]} of image {task.image_id!r} are in "
                        f"{ctx.pred_json or 'the prediction JSON'} but not in the PNG")

    gt_cat = _slot_categories(gt_table.ids, gt_segs, ctx.cat_index, unknown_cat)
    pred_cat = _slot_categories(pred_table.ids, pred_segs, ctx.cat_index, unknown_cat)
    counts = _match(hist, p_area, gt_void, gt_segs, gt_table.ids, gt_cat, pred_cat, unknown_cat + 1)
    conf = None
    if ctx.semseg_index is not None:
        conf = _semantic_confusion(hist, gt_table.ids, gt_segs, pred_table.ids, pred_segs, ctx.semseg_index)
    return counts, conf


def _pair_histogram(task: ImageTask, ctx: _Context, gt_table: IdTable, pred_table: IdTable) -> np.ndarray:
    """(G+1)×(P+1) int64 pixel counts of (GT slot, prediction slot) pairs; the last slots = other ids.

    Both PNGs are reduced to runs of equal ids, so every step after decoding works on a few thousand
    runs rather than on every pixel.
    """
    gt_runs = read_panoptic_runs(task.gt_png) if ctx.gt_cache is None else ctx.gt_cache.read(task.gt_png)
    pred_runs = read_panoptic_runs(task.pred_png)
    if gt_runs.shape != pred_runs.shape:
        raise DataError(task.pred_png, f"size {pred_runs.shape[::-1]} differs from the ground truth "
                        f"{task.gt_png} {gt_runs.shape[::-1]} (W×H)")
    # GT ids missing from the JSON share the "other" slot; prediction ids missing from it are an error
    hist, pred_known = pair_histogram(gt_runs, gt_table, pred_runs, pred_table)
    if not pred_known:
        _, known = pred_table.lookup(pred_runs.ids)
        extra = np.unique(pred_runs.ids[~known])
        raise DataError(task.pred_png, f"segment ids {extra[:10].tolist()} are in the PNG but not in the "
                        f"segments_info of image {task.image_id!r} in {ctx.pred_json or 'the prediction JSON'}")
    return hist


def _slot_categories(slot_ids: np.ndarray, segs: dict, cat_index: dict, unknown: int) -> np.ndarray:
    """Category position of each slot (plus the "other" slot); -1 = not a segment of the JSON."""
    out = np.full(len(slot_ids) + 1, -1, dtype=np.intp)
    for s, seg_id in enumerate(slot_ids.tolist()):
        if seg_id in segs:
            out[s] = cat_index.get(segs[seg_id]["category_id"], unknown)
    return out


def _match(
    hist: np.ndarray, p_area: np.ndarray, gt_void: int, gt_segs: dict, gt_slot_ids: np.ndarray,
    gt_cat: np.ndarray, pred_cat: np.ndarray, n_cats: int,
) -> np.ndarray:
    """TP/FP/FN counting on the G×P pair histogram; returns 4×n_cats (iou, tp, fp, fn)."""
    crowd = np.zeros(len(gt_cat), dtype=bool)
    gt_area = np.zeros(len(gt_cat), dtype=np.float64)
    crowd_slot_of_cat = {}  # the last crowd segment listed for a category stands for all of them
    for s, seg_id in enumerate(gt_slot_ids.tolist()):
        seg = gt_segs.get(seg_id)
        if seg is None:
            continue
        gt_area[s] = seg["area"]
        crowd[s] = seg.get("iscrowd", 0) == 1
    for seg_id, seg in gt_segs.items():  # dict order = panopticapi's iteration order
        if seg.get("iscrowd", 0) == 1:
            crowd_slot_of_cat[gt_cat[int(np.searchsorted(gt_slot_ids, seg_id))]] = seg_id

    void_overlap = hist[gt_void]  # P: pixels of each prediction on GT VOID
    candidate = (gt_cat[:, None] >= 0) & ~crowd[:, None] & (pred_cat[None, :] >= 0)
    candidate &= (gt_cat[:, None] == pred_cat[None, :]) & (hist > 0)
    gi, pj = np.nonzero(candidate)
    inter = hist[gi, pj]
    iou = inter / (p_area[pj] + gt_area[gi] - inter - void_overlap[pj])
    keep = iou > MATCH_IOU
    gi, pj, iou = gi[keep], pj[keep], iou[keep]

    counts = np.zeros((4, n_cats), dtype=np.float64)
    counts[0] = np.bincount(gt_cat[gi], weights=iou, minlength=n_cats)
    counts[1] = np.bincount(gt_cat[gi], minlength=n_cats)
    gt_matched = np.zeros(len(gt_cat), dtype=bool)
    gt_matched[gi] = True
    fn = (gt_cat >= 0) & ~crowd & ~gt_matched
    counts[3] = np.bincount(gt_cat[fn], minlength=n_cats)

    pred_matched = np.zeros(len(pred_cat), dtype=bool)
    pred_matched[pj] = True
    unmatched = np.nonzero((pred_cat >= 0) & ~pred_matched)[0]
    ignored_pixels = void_overlap[unmatched].astype(np.float64)
    for k, s in enumerate(unmatched.tolist()):
        crowd_id = crowd_slot_of_cat.get(pred_cat[s])
        if crowd_id is not None:
            ignored_pixels[k] += hist[int(np.searchsorted(gt_slot_ids, crowd_id)), s]
    fp = unmatched[ignored_pixels / p_area[unmatched] <= IGNORED_FRACTION]
    counts[2] = np.bincount(pred_cat[fp], minlength=n_cats)
    return counts


def _semantic_confusion(
    hist: np.ndarray, gt_slot_ids: np.ndarray, gt_segs: dict, pred_slot_ids: np.ndarray, pred_segs: dict,
    semseg_index: dict,
) -> np.ndarray:
    """(K+1)×(K+1) confusion (rows = prediction, columns = GT, index K = ignore) from the pair histogram.

    Every pixel of a slot has the slot's class, so summing ``hist`` by class pair equals the
    pixel-level confusion of the semantic maps, without building them.
    """
    k = len(semseg_index)
    g_cls = _slot_classes(gt_slot_ids, gt_segs, semseg_index, k)
    p_cls = _slot_classes(pred_slot_ids, pred_segs, semseg_index, k)
    conf = np.zeros((k + 1, k + 1), dtype=np.int64)
    np.add.at(conf, (p_cls[None, :], g_cls[:, None]), hist)
    return conf


def _slot_classes(slot_ids: np.ndarray, segs: dict, semseg_index: dict, ignore: int) -> np.ndarray:
    out = np.full(len(slot_ids) + 1, ignore, dtype=np.intp)
    for s, seg_id in enumerate(slot_ids.tolist()):
        if seg_id in segs:
            out[s] = semseg_index.get(segs[seg_id]["category_id"], ignore)
    return out


def _run_chunk(ctx: _Context, chunk: list[ImageTask]) -> tuple[np.ndarray, np.ndarray | None]:
    """Worker thread entry: the counts (and confusion) of a chunk, summed in image order; a DataError propagates."""
    counts, conf = _image_counts(chunk[0], ctx)
    for task in chunk[1:]:
        c, m = _image_counts(task, ctx)
        counts = counts + c
        conf = None if m is None else conf + m
    return counts, conf


def collect_stats(
    gt_json: str | Path | Mapping, gt_dir: str | Path, pred_json: str | Path | Mapping, pred_dir: str | Path,
    *, workers: int | None = None, progress: bool = True, semseg_index: dict | None = None,
    gt_cache_dir: str | Path | None = None,
) -> tuple[PQStats, np.ndarray | None]:
    """Evaluate every GT image against its prediction.

    Args:
        gt_json, pred_json: COCO panoptic JSON paths (or parsed dicts).
        gt_dir, pred_dir: folders of the panoptic PNGs named by ``file_name``.
        workers: worker threads (default: the usable CPUs, at most 8); ≤ 1 runs in the calling thread.
        progress: show a progress bar on stderr.
        semseg_index: category id -> contiguous class; when given, also return the
            (K+1)×(K+1) semantic confusion matrix of the panoptic maps (rows = prediction).
        gt_cache_dir: optional folder keeping decoded GT maps between calls (see ``GTRunCache``);
            worth it when the same ground truth is evaluated repeatedly, e.g. during training.
    Returns:
        (PQ sums per category, confusion matrix or None).
    """
    gt, gt_path = load_json(gt_json, "ground-truth")
    pred, pred_path = load_json(pred_json, "prediction")
    categories = load_categories(gt, gt_path)
    cat_index = {}
    for cat in categories:
        cat_index.setdefault(cat["id"], len(cat_index))
    # a repeated category id keeps its first position and its last definition, like a dict
    by_id = {cat["id"]: cat for cat in categories}
    stats = PQStats([by_id[cid] for cid in cat_index])
    for folder in (gt_dir, pred_dir):
        if not os.path.isdir(folder):
            raise DataError(folder, "folder of panoptic PNG files not found")
    tasks = pair_annotations(gt, gt_path, gt_dir, pred, pred_path, pred_dir)
    # the cache folder is created (or fails) once, before any worker starts
    ctx = _Context(cat_index, pred_path, semseg_index, None if gt_cache_dir is None else GTRunCache(gt_cache_dir))
    conf = [np.zeros((len(semseg_index) + 1,) * 2, dtype=np.int64)] if semseg_index is not None else [None]

    def consume(out: tuple[np.ndarray, np.ndarray | None]) -> None:
        counts, chunk_conf = out
        stats.add(counts)
        if chunk_conf is not None:
            conf[0] += chunk_conf

    _evaluate_chunks(ctx, tasks, workers, progress, consume)
    return stats, conf[0]


def default_workers() -> int:
    """Worker threads when none are asked for: the CPUs this process may use, at most ``_MAX_DEFAULT_WORKERS``."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, _MAX_DEFAULT_WORKERS))


def _evaluate_chunks(
    ctx: _Context, tasks: list[ImageTask], workers: int | None, progress: bool, consume: Callable[[tuple], None],
) -> None:
    """Evaluate chunks of images (in a thread pool when worthwhile) and hand each chunk's sums to ``consume``.

    Chunks have a fixed size and are consumed in task order whatever the number of threads, so the float
    sums (and so the result) are the same bit for bit with 1 or N workers. At most ``_AHEAD`` chunks per
    thread wait to be consumed (bounded memory on large sets). An error, from an image or from ``consume``,
    cancels the chunks not started yet; the ``with`` block waits for the running ones.
    """
    from tqdm import tqdm

    workers = default_workers() if workers is None else workers
    chunks = [tasks[i:i + _CHUNK_IMAGES] for i in range(0, len(tasks), _CHUNK_IMAGES)]
    with tqdm(total=len(tasks), desc="PQ", unit="img", file=sys.stderr, disable=not progress) as bar:
        if workers <= 1 or len(chunks) <= 1:
            for chunk in chunks:
                consume(_run_chunk(ctx, chunk))
                bar.update(len(chunk))
            return
        preload_decoder()  # lazy imports of the PNG plugin and pyarrow happen once, not in every thread
        threads = min(workers, len(chunks))
        with ThreadPoolExecutor(threads, thread_name_prefix="dearli-pq") as pool:
            todo = iter(chunks)
            pending = collections.deque((pool.submit(_run_chunk, ctx, c), len(c))
                                        for c in itertools.islice(todo, _AHEAD * threads))
            try:
                while pending:
                    future, size = pending.popleft()
                    consume(future.result())
                    bar.update(size)
                    for chunk in itertools.islice(todo, 1):
                        pending.append((pool.submit(_run_chunk, ctx, chunk), len(chunk)))
            finally:
                for future, _ in pending:
                    future.cancel()


def pq_compute(
    gt_json: str | Path | Mapping, gt_dir: str | Path, pred_json: str | Path | Mapping, pred_dir: str | Path,
    *, workers: int | None = None, progress: bool = True, gt_cache_dir: str | Path | None = None,
) -> dict:
    """Panoptic quality of a prediction set, as panopticapi's ``pq_compute`` returns it.

    Arguments are those of :func:`collect_stats`; ``gt_cache_dir`` never changes the result.

    Returns:
        ``{"All"|"Things"|"Stuff": {"pq", "sq", "rq", "n"}, "per_class": {category_id: {"pq", "sq", "rq"}}}``
        with fractions in [0, 1].
    """
    stats, _ = collect_stats(gt_json, gt_dir, pred_json, pred_dir, workers=workers, progress=progress,
                             gt_cache_dir=gt_cache_dir)
    return pq_from_stats(stats)
