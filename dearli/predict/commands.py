"""``dearli predict``: run a checkpoint over a split, write COCO panoptic predictions, print PQ and mIoU."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict", help="predict a split with a trained checkpoint and score it (PQ, mIoU)",
        description="Load a checkpoint written by 'dearli train', predict every image of a dataset split, write "
        "the predictions as COCO panoptic (PNG + JSON) under --out, and print PQ/SQ/RQ and mIoU. "
        "--alpha-clip sets the weight of the zero-shot CLIP branch in the geometric ensemble "
        "(default: the checkpoint's model.ensemble.alpha_clip; 0 = decoder only).",
        epilog="example: dearli predict --checkpoint runs/sup/checkpoints/step_0002000.pt --dataset runs/synth "
        "--out runs/sup/pred_val",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint file (checkpoints/step_NNNNNNN.pt)")
    parser.add_argument("--dataset", required=True, help="dataset directory (with dataset.yaml)")
    parser.add_argument("--split", default="val", help="split to predict (default: val)")
    parser.add_argument("--out", required=True, help="new directory for the predictions")
    parser.add_argument("--alpha-clip", type=float, default=None, help="CLIP weight of the ensemble, in [0, 1]")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from dearli.data.dataset import load_dataset
    from dearli.errors import ConfigError
    from dearli.model.m2f_lang import build_m2f_lang
    from dearli.training.checkpoint import load_checkpoint, restore
    from dearli.training.evaluate import evaluate_model
    from dearli.training.step import resolve_device

    if args.alpha_clip is not None and not 0.0 <= args.alpha_clip <= 1.0:
        raise ConfigError(f"--alpha-clip must lie in [0, 1], got {args.alpha_clip}")
    device = resolve_device(args.device)
    payload = load_checkpoint(args.checkpoint, device)
    cfg = payload["config"]
    info = load_dataset(args.dataset)
    model = build_m2f_lang(cfg.model, info.categories.synonyms).to(device)
    restore(model, payload)
    result = evaluate_model(model, cfg.model, info, args.split, args.out, alpha_clip=args.alpha_clip)
    if args.json:
        print(json.dumps(result["summary"]))
    else:
        print(" ".join(f"{k} {v:.2f}" for k, v in result["summary"].items()))
        print(f"predictions: {result['pred_json']}")
    return 0
