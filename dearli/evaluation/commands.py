"""``dearli evaluate``: panoptic quality (and optionally mIoU_pan) of COCO panoptic predictions."""

from __future__ import annotations

import argparse
import json
import math
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="panoptic quality (PQ/SQ/RQ) of COCO panoptic predictions",
        description="Compute PQ, SQ and RQ of COCO panoptic predictions (JSON + PNG folder) against the ground "
        "truth, with the rules of cocodataset/panopticapi's pq_compute. Prints a table (values ×100) or, with "
        "--json, one JSON object with fractions. Progress goes to stderr.",
    )
    parser.add_argument("--gt-json", required=True, help="ground-truth COCO panoptic JSON (with 'categories')")
    parser.add_argument("--gt-dir", required=True, help="folder of the ground-truth panoptic PNG files")
    parser.add_argument("--pred-json", required=True, help="prediction COCO panoptic JSON")
    parser.add_argument("--pred-dir", required=True, help="folder of the predicted panoptic PNG files")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: All/Things/Stuff {pq, sq, rq, n} and per_class, as fractions "
                        "(with --semseg also semseg_pan: miou, fwiou, macc, pacc and per_class)")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker threads (default: the usable CPUs, at most 8; 1 = in the calling thread)")
    parser.add_argument("--semseg", action="store_true",
                        help="also report mIoU_pan, fwIoU_pan, mACC_pan and pACC_pan: the panoptic predictions "
                        "turned into semantic maps (each segment's pixels get its class, unassigned pixels are "
                        "misses; classes = GT categories by increasing id; GT VOID = ignore). This is not the mIoU "
                        "of 'dearli train' and 'dearli predict', which score the model's semantic inference as "
                        "detectron2 does; they print this number as mIoU_pan too")
    parser.add_argument("--per-class", action="store_true", help="list every class in the table")
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    parser.add_argument("--gt-cache-dir", default=None,
                        help="keep decoded ground truth here to speed up repeated evaluations of the same GT "
                        "(entries are keyed by file path, size and mtime)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dearli.errors import ConfigError
    from dearli.evaluation.panoptic_io import load_categories, load_json
    from dearli.evaluation.pq import pq_compute
    from dearli.evaluation.semseg import contiguous_category_ids, evaluate_semseg_panoptic

    if args.workers is not None and args.workers < 1:
        raise ConfigError("--workers must be ≥ 1")
    gt, gt_path = load_json(args.gt_json, "ground-truth")
    names = {cat["id"]: str(cat.get("name", cat["id"])) for cat in load_categories(gt, gt_path)}
    progress = not args.no_progress
    files = (args.gt_json, args.gt_dir, args.pred_json, args.pred_dir)
    semseg = None
    if args.semseg:
        semseg = evaluate_semseg_panoptic(*files, workers=args.workers, progress=progress,
                                          gt_cache_dir=args.gt_cache_dir)
        pq = semseg.pop("pq")
        classes = contiguous_category_ids(list(gt["categories"]))
    else:
        pq = pq_compute(*files, workers=args.workers, progress=progress, gt_cache_dir=args.gt_cache_dir)
    if args.json:
        out = {group: pq[group] for group in ("All", "Things", "Stuff")}
        out["per_class"] = {str(cid): {"name": names[cid], **vals} for cid, vals in pq["per_class"].items()}
        if semseg is not None:
            out["semseg_pan"] = _semseg_json(semseg, classes, names)
        json.dump(out, sys.stdout, allow_nan=False)
        sys.stdout.write("\n")
        return 0
    _print_table(pq, names, args.per_class)
    if semseg is not None:
        _print_semseg(semseg, classes, names, args.per_class)
    return 0


def _finite(x: float) -> float | None:
    return None if x is None or math.isnan(x) else x


def _semseg_json(semseg: dict, classes: dict, names: dict) -> dict:
    out = {key: _finite(semseg[key]) for key in ("miou", "fwiou", "macc", "pacc")}
    out["per_class"] = {str(cid): {"name": names[cid], "iou": _finite(semseg["iou"][k]),
                                   "acc": _finite(semseg["acc"][k])} for cid, k in classes.items()}
    return out


def _print_table(pq: dict, names: dict, per_class: bool) -> None:
    print(f"{'':14s}| {'PQ':>6s} {'SQ':>6s} {'RQ':>6s} {'N':>5s}")
    print("-" * 43)
    for group in ("All", "Things", "Stuff"):
        r = pq[group]
        print(f"{group:14s}| {100 * r['pq']:6.1f} {100 * r['sq']:6.1f} {100 * r['rq']:6.1f} {r['n']:5d}")
    if per_class:
        print("-" * 43)
        for cid, r in pq["per_class"].items():
            print(f"{names[cid][:14]:14s}| {100 * r['pq']:6.1f} {100 * r['sq']:6.1f} {100 * r['rq']:6.1f}")


def _print_semseg(semseg: dict, classes: dict, names: dict, per_class: bool) -> None:
    print()
    print("  ".join(f"{label}_pan {100 * semseg[key]:5.1f}" for label, key in
                    (("mIoU", "miou"), ("fwIoU", "fwiou"), ("mACC", "macc"), ("pACC", "pacc"))))
    if per_class:
        for cid, k in classes.items():
            iou, acc = semseg["iou"][k], semseg["acc"][k]
            print(f"{names[cid][:14]:14s}| IoU {100 * iou:6.1f}  ACC {100 * acc:6.1f}")
