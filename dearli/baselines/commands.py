"""``dearli baseline sam-clip | oracle``: zero-shot baselines computed from the caches."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "baseline", help="zero-shot panoptic baselines from the SAM / CLIP caches",
        description="Training-free baselines read from caches built by 'dearli cache': classify masks by "
        "pooling cached dense CLIP features inside them (FC-CLIP's CLIP branch), write COCO panoptic "
        "predictions and score them.",
    )
    sub = parser.add_subparsers(dest="baseline", metavar="BASELINE")
    sam_clip = sub.add_parser(
        "sam-clip", help="SAM masks named by CLIP: write predictions, print PQ",
        description="Classify every cached SAM mask of a split by CLIP mask pooling, merge the masks into a "
        "panoptic map (highest score wins each pixel; a mask must keep --overlap-threshold of its area), write "
        "OUT/panoptic/*.png + OUT/panoptic.json + OUT/metrics.json and print PQ.",
    )
    _add_common(sam_clip)
    sam_clip.add_argument("--sam-cache", required=True, metavar="URI", help="cache from 'dearli cache sam'")
    sam_clip.add_argument("--out", required=True, metavar="PRED_DIR", help="new directory for the predictions")
    sam_clip.add_argument("--score-threshold", type=float, default=0.0,
                          help="drop masks scoring (class probability × SAM IoU) at most this (default 0)")
    sam_clip.add_argument("--overlap-threshold", type=float, default=0.5,
                          help="keep a mask only if it owns this share of its pixels (default 0.5)")
    sam_clip.add_argument("--min-area", type=int, default=0, help="ignore SAM masks smaller than this (pixels)")
    sam_clip.add_argument("--no-mask-quality", action="store_true",
                          help="score masks by class probability alone, not times SAM's predicted IoU")
    sam_clip.set_defaults(handler=run_sam_clip_command)

    oracle = sub.add_parser(
        "oracle", help="ground-truth masks named by CLIP: recognition accuracy and PQ",
        description="The zero-shot oracle: classify every ground-truth segment of a split by CLIP mask pooling "
        "of the cached features; print recognition accuracy and the PQ of the resulting prediction.",
    )
    _add_common(oracle)
    oracle.add_argument("--out", default=None, metavar="PRED_DIR",
                        help="keep the predictions here (default: a temporary directory)")
    oracle.set_defaults(handler=run_oracle_command)
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, metavar="DIR", help="dataset directory (with dataset.yaml)")
    parser.add_argument("--split", default="val", help="split to predict and evaluate (default: val)")
    parser.add_argument("--clip-cache", required=True, metavar="URI", help="cache from 'dearli cache clip'")


def run_sam_clip_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dearli.baselines.prediction_set import pq_line
    from dearli.baselines.sam_clip import SamClipOptions, run_sam_clip
    from dearli.data.dataset import load_dataset

    options = SamClipOptions(args.score_threshold, args.overlap_threshold, args.min_area, not args.no_mask_quality)
    result = run_sam_clip(load_dataset(args.dataset), args.split, args.sam_cache, args.clip_cache, args.out, options)
    (Path(args.out) / "metrics.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"sam-clip on {args.split} ({result['num_masks']} masks): {pq_line(result['pq'])}")
    print(f"predictions: {result['pred_json']}")
    return 0


def run_oracle_command(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from dearli.baselines.oracle import run_oracle
    from dearli.baselines.prediction_set import pq_line
    from dearli.data.dataset import load_dataset

    info = load_dataset(args.dataset)
    with tempfile.TemporaryDirectory(prefix="dearli-oracle-") as tmp:
        out = args.out or tmp
        result = run_oracle(info, args.split, args.clip_cache, out)
        if args.out:
            (Path(out) / "metrics.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"oracle on {args.split}: recognition accuracy {100 * result['accuracy']:.2f}% "
          f"over {result['num_segments']} segments; {pq_line(result['pq'])}")
    return 0
