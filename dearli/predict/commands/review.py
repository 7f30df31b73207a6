"""``dearli review``: a review page (HTML + overlays) of a pseudo-label or predict output."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "review", help="write a review page of pseudo-labels or predictions (open it in a browser)",
        description="From a 'dearli pseudo-label' output (or a 'dearli predict' output with --dataset) write "
        "REVIEW/index.html and REVIEW/images/: every image with its segments drawn over it, least sure first "
        "(area-weighted mean class score), per-class segment counts and score histograms, a class filter and "
        "other orders. With --checkpoint each image's decoder-vs-CLIP disagreement is measured too (one more "
        "forward pass per image). The page needs no server: open the file.",
        epilog="example: dearli review runs/labels --checkpoint models:/dearli/1, then open "
        "runs/labels/review/index.html",
    )
    parser.add_argument("labels", help="output folder of 'dearli pseudo-label' or 'dearli predict'")
    parser.add_argument("--dataset", default=None, help="for a predict output: the dataset it predicted")
    parser.add_argument("--split", default="val", help="for a predict output: the split it predicted (default: val)")
    parser.add_argument("--checkpoint", default=None,
                        help="also measure decoder-vs-CLIP disagreement with this checkpoint (models:/dearli/N too)")
    parser.add_argument("--out", default=None, metavar="DIR", help="page folder (default: LABELS/review; an "
                        "existing page is never replaced)")
    parser.add_argument("--limit", type=int, default=0, metavar="N", help="only the N least sure images (0 = all)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (for --checkpoint)")
    parser.set_defaults(handler=_run)


def _pseudo_label_items(root: Path) -> tuple[list[Any], list[dict]]:
    from dearli.caches.store import CacheStore
    from dearli.predict.outputs import read_rows
    from dearli.predict.review import ReviewItem

    rows = read_rows(CacheStore(str(root)))
    items = [ReviewItem(row["stem"], Path(row["image_path"]), root / "panoptic" / row["file_name"], row["segments"])
             for row in rows]
    return items, json.loads((root / "panoptic.json").read_text())["categories"]


def _predict_items(root: Path, dataset: str, split_name: str) -> tuple[list[Any], list[dict]]:
    from PIL import Image

    from dearli.data.coco_format import rgb2id
    from dearli.data.dataset import load_dataset
    from dearli.errors import DataError
    from dearli.predict.review import ReviewItem

    predicted = json.loads((root / "panoptic.json").read_text())
    split = load_dataset(dataset).split(split_name)
    by_id = {str(r.image_id): r for r in split.records}
    names = {c["id"]: c["name"].split(",")[0].strip() for c in predicted["categories"]}
    unknown = sorted({repr(s["category_id"]) for a in predicted["annotations"] for s in a["segments_info"]
                      if s["category_id"] not in names})
    if unknown:
        raise DataError(root / "panoptic.json", f"segments_info names category_id {unknown[0]}, which no entry "
                                                "of categories has")
    if any("score" not in s for a in predicted["annotations"] for s in a["segments_info"]):
        print("review: these predictions carry no class scores (made before 'dearli predict' recorded them): "
              "every segment counts as sure (1.0); predict again for a useful order")
    items = []
    for ann in predicted["annotations"]:
        record = by_id.get(str(ann["image_id"]))
        if record is None:
            raise DataError(root / "panoptic.json", f"image {ann['image_id']} is not in {dataset} split {split_name}")
        ids = rgb2id(np.asarray(Image.open(root / "panoptic" / ann["file_name"]).convert("RGB")))
        segments = [{"id": s["id"], "category_id": s["category_id"], "category_name": names[s["category_id"]],
                     "isthing": bool(s.get("isthing", 0)), "score": float(s.get("score", 1.0)),
                     "area": int((ids == s["id"]).sum())} for s in ann["segments_info"]]
        items.append(ReviewItem(record.stem, Path(record.image_path), root / "panoptic" / ann["file_name"], segments))
    return items, predicted["categories"]


def _measure_disagreement(items: list[Any], categories: list[dict], args: argparse.Namespace) -> None:
    from PIL import Image

    from dearli.data.panoptic import CategoryMap
    from dearli.device import resolve_device
    from dearli.predict.model_source import checkpoint_file
    from dearli.predict.uncertainty import image_signals
    from dearli.predict.worker import load_predictor

    model, cfg = load_predictor(checkpoint_file(args.checkpoint), CategoryMap.from_dicts(categories, "labels"),
                                resolve_device(args.device))
    for item in items:
        with Image.open(item.image_path) as picture:
            image = np.array(picture.convert("RGB"))  # writable: torch.from_numpy warns on a read-only view
        item.signals = image_signals(model, image, cfg.model, cfg.model.ensemble.alpha_clip)


def _run(args: argparse.Namespace) -> int:
    from dearli.caches.store import MANIFEST
    from dearli.errors import ConfigError, DataError
    from dearli.predict.review import readable, refuse_existing_page, write_review

    root = Path(args.labels)
    if not (root / "panoptic.json").is_file():
        raise DataError(root, "holds no panoptic.json: pass the output folder of 'dearli pseudo-label' or "
                              "'dearli predict'")
    out = Path(args.out) if args.out else root / "review"
    refuse_existing_page(out)
    if (root / MANIFEST).is_file():
        items, categories = _pseudo_label_items(root)
    elif args.dataset:
        items, categories = _predict_items(root, args.dataset, args.split)
    else:
        raise ConfigError(f"{root} is a predict output: pass --dataset (and --split) to find its images")
    items, missing = readable(items)
    if missing:  # moved or deleted images: the page shows the rest and says which
        print(f"review: {len(missing)} image(s) left out, their files are gone: " + "; ".join(missing[:5])
              + (" ..." if len(missing) > 5 else ""))
    if not items:
        raise DataError(root, "no image of these labels can be read; nothing to review")
    items.sort(key=lambda i: (i.confidence, i.stem))
    if args.limit > 0:
        items = items[: args.limit]
    if args.checkpoint:
        _measure_disagreement(items, categories, args)
    page = write_review(items, out, f"dearli review: {root.name}")
    print(f"review: {len(items)} images, least sure {items[0].stem if items else '-'}: {page}")
    return 0
