"""``dearli bench annotation``: how much work pseudo-labels leave an annotator, against labelling from nothing.

An annotator correcting a pre-annotated image (say in Label Studio) keeps some predicted regions, fixes
others, draws what is missing and deletes what is wrong. With the ground truth known (the synthetic world, or
any split with annotations), the work per image is counted region by region. IoU is that of the two masks
over the whole image; two segments with IoU above 0.5 are each other's only such match (segments of one map
do not overlap), as in PQ.

- keep: a predicted segment with IoU > 0.5 with a ground-truth segment of its class: accepted as it is;
- relabel: IoU > 0.5 with a ground-truth segment of another class: the label is changed, the mask kept;
- reshape: a predicted segment without such a match whose IoU with an unmatched ground-truth segment of its
  class is above 0.1 (and at most 0.5): the mask is redrawn, the label kept. Pairs are taken by decreasing
  IoU, each segment once;
- add: a ground-truth segment nothing above matches: drawn from nothing;
- delete: a predicted segment nothing above matches: removed.

Edits are relabel + reshape + add + delete; labelling from nothing is one add per ground-truth segment
(crowd regions included: an annotator draws those as well).
"""

from __future__ import annotations

import argparse
import csv
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

MATCH_IOU = 0.5  # above: the predicted segment is the ground-truth segment (kept or relabelled)
RESHAPE_IOU = 0.1  # above (up to MATCH_IOU), same class: the predicted mask is redrawn rather than deleted
COUNTS = ("keep", "relabel", "reshape", "add", "delete")


@dataclass(frozen=True)
class Work:
    """The annotator's work on one image: segments of each kind, and the ground truth's and prediction's."""

    keep: int
    relabel: int
    reshape: int
    add: int
    delete: int
    truth: int  # ground-truth segments: the adds of labelling from nothing
    predicted: int

    @property
    def edits(self) -> int:
        return self.relabel + self.reshape + self.add + self.delete


def overlaps(pred_map: np.ndarray, truth_map: np.ndarray) -> dict[tuple[int, int], tuple[int, int]]:
    """(predicted id, ground-truth id) -> (intersection, union) in pixels, for every pair that overlaps.
    Id 0 is unlabeled on both sides and never part of a pair."""
    if pred_map.shape != truth_map.shape:
        raise ValueError(f"prediction is {pred_map.shape}, ground truth {truth_map.shape}")
    pred, truth = pred_map.astype(np.int64).ravel(), truth_map.astype(np.int64).ravel()
    pred_ids, pred_area = np.unique(pred, return_counts=True)
    truth_ids, truth_area = np.unique(truth, return_counts=True)
    pred_areas, truth_areas = dict(zip(pred_ids.tolist(), pred_area.tolist())), dict(
        zip(truth_ids.tolist(), truth_area.tolist()))
    width = int(truth.max()) + 1 if truth.size else 1
    pairs, counts = np.unique(pred * width + truth, return_counts=True)
    found = {}
    for key, inter in zip(pairs.tolist(), counts.tolist()):
        p, t = divmod(key, width)
        if p and t:
            found[(p, t)] = (inter, pred_areas[p] + truth_areas[t] - inter)
    return found


def annotator_work(pred_map: np.ndarray, pred_segments: Sequence[tuple[int, int]], truth_map: np.ndarray,
                   truth_segments: Sequence[tuple[int, int]]) -> Work:
    """The work of turning the prediction into the ground truth (see the module's docstring).

    ``*_map``: H×W segment ids (0 = unlabeled); ``*_segments``: (segment id, category id) of each segment.
    """
    pred_class, truth_class = dict(pred_segments), dict(truth_segments)
    ious = {pair: inter / union for pair, (inter, union) in overlaps(pred_map, truth_map).items()
            if pair[0] in pred_class and pair[1] in truth_class}
    matched_pred: set[int] = set()
    matched_truth: set[int] = set()
    keep = relabel = reshape = 0
    for (p, t), iou in ious.items():
        if iou > MATCH_IOU:
            matched_pred.add(p)
            matched_truth.add(t)
            if pred_class[p] == truth_class[t]:
                keep += 1
            else:
                relabel += 1
    near = sorted(((iou, p, t) for (p, t), iou in ious.items()
                   if RESHAPE_IOU < iou <= MATCH_IOU and pred_class[p] == truth_class[t]), reverse=True)
    for _, p, t in near:
        if p not in matched_pred and t not in matched_truth:
            matched_pred.add(p)
            matched_truth.add(t)
            reshape += 1
    return Work(keep=keep, relabel=relabel, reshape=reshape, add=len(truth_class) - len(matched_truth),
                delete=len(pred_class) - len(matched_pred), truth=len(truth_class), predicted=len(pred_class))


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    parser = bench_subparsers.add_parser(
        "annotation", help="count an annotator's edits of pseudo-labels against labelling from nothing",
        description="Compare each image of a 'dearli pseudo-label' output with its ground truth in a dataset "
        "split and count the annotator's work region by region: predicted segments kept (IoU > 0.5, its "
        "class), relabelled (IoU > 0.5, another class), reshaped (IoU in (0.1, 0.5], its class), deleted (no "
        "match), and ground-truth segments added (nothing matches). Labelling from nothing adds every "
        "ground-truth segment. Prints one line per image, the mean per image and the totals.",
        epilog="example: dearli bench annotation --labels runs/pseudo --dataset runs/synth --suggestions "
        "runs/synth/partitions/1_8_next/suggestions.csv --top 25",
    )
    parser.add_argument("--labels", required=True, metavar="DIR", help="output folder of 'dearli pseudo-label'")
    parser.add_argument("--dataset", required=True, help="dataset directory whose split holds the ground truth")
    parser.add_argument("--split", default="train", help="the split with the images' annotations (default: train)")
    parser.add_argument("--suggestions", default=None, metavar="CSV",
                        help="suggestions.csv of 'dearli suggest': only its --top images (default: every image "
                        "of LABELS)")
    parser.add_argument("--top", type=int, default=None, metavar="N", help="with --suggestions: its first N rows")
    parser.add_argument("--csv", default=None, metavar="FILE", help="also write the per-image counts as CSV")
    parser.set_defaults(handler=_run)


def _suggested(path: Path, top: int | None) -> list[str]:
    from dearli.errors import DataError

    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
        ranked = sorted(rows, key=lambda row: int(row["rank"]))
        stems = [row["stem"] for row in ranked]
    except (OSError, KeyError, ValueError) as err:
        raise DataError(path, f"cannot read the suggestions (rank, stem, ...): {err}") from None
    return stems if top is None else stems[:top]


def _pseudo_label(labels: Path, row: dict[str, Any]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    from PIL import Image

    from dearli.data.coco_format import rgb2id
    from dearli.errors import DataError
    from dearli.predict.outputs import PANOPTIC_DIR

    path = labels / PANOPTIC_DIR / row["file_name"]
    try:
        with Image.open(path) as png:
            segment_map = rgb2id(np.asarray(png.convert("RGB")))
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(path, f"cannot read the panoptic PNG: {err}") from None
    return segment_map, [(int(s["id"]), int(s["category_id"])) for s in row["segments"]]


def measure(labels: str | Path, dataset: str | Path, split_name: str = "train",
            stems: Sequence[str] | None = None) -> list[tuple[str, Work]]:
    """(stem, Work) of every image of the pseudo-label output ``labels`` (or of ``stems``, in their order)
    against its annotation in the split; DataError for an image missing from either, or without annotation."""
    from dearli.annotation.label_studio import read_pseudo_labels
    from dearli.data.dataset import load_dataset
    from dearli.data.panoptic import read_segment_map
    from dearli.errors import DataError

    rows, categories = read_pseudo_labels(labels)
    split = load_dataset(dataset).split(split_name)
    unknown = sorted({c.id for c in categories.categories} - set(split.categories.dataset_ids))
    if unknown:
        raise DataError(labels, f"classes {unknown} are not classes of the dataset: pseudo-label with its classes")
    by_stem = {row["stem"]: row for row in rows}
    stems = list(by_stem) if stems is None else list(stems)
    measured = []
    for stem in stems:
        if stem not in by_stem:
            raise DataError(labels, f"has no pseudo-label of '{stem}'")
        record = split.record(stem)
        if not record.segments_info:
            raise DataError(split.json_path, f"'{stem}' has no annotation to compare with")
        truth = read_segment_map(record, split.json_path), [(s.id, s.category_id) for s in record.segments_info]
        measured.append((stem, annotator_work(*_pseudo_label(Path(labels), by_stem[stem]), *truth)))
    return measured


def _table(measured: list[tuple[str, Work]]) -> str:
    columns = ("truth", "predicted", *COUNTS, "edits")
    lines = [f"{'image':<20}" + "".join(f"{c:>10}" for c in columns)]
    for stem, work in measured:
        lines.append(f"{stem:<20}" + "".join(f"{getattr(work, c):>10}" for c in columns))
    n = len(measured)
    totals = {c: sum(getattr(w, c) for _, w in measured) for c in columns}
    lines.append(f"{'mean per image':<20}" + "".join(f"{totals[c] / n:>10.2f}" for c in columns))
    lines.append(f"{'total':<20}" + "".join(f"{totals[c]:>10}" for c in columns))
    lines.append(f"{n} images: {totals['edits']} edits with the pseudo-labels ({totals['keep']} regions kept as "
                 f"predicted) against {totals['truth']} regions drawn from nothing "
                 f"({totals['edits'] / max(totals['truth'], 1):.0%} of the regions' work)")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    from dearli.caches.store import write_atomic
    from dearli.errors import ConfigError

    if args.top is not None and (args.suggestions is None or args.top < 1):
        raise ConfigError("--top takes a positive N and needs --suggestions")
    stems = _suggested(Path(args.suggestions), args.top) if args.suggestions else None
    measured = measure(args.labels, args.dataset, args.split, stems)
    if not measured:
        raise ConfigError("no image to compare")
    print(_table(measured))
    if args.csv:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=["stem", *asdict(measured[0][1]), "edits"])
        writer.writeheader()
        writer.writerows({"stem": stem, **asdict(work), "edits": work.edits} for stem, work in measured)
        write_atomic(Path(args.csv), text.getvalue().encode())
    return 0
