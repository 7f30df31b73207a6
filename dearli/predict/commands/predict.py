"""``dearli predict``: run a checkpoint over a split, write COCO panoptic predictions, print PQ, mIoU, mIoU_pan."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict", help="predict a split with a trained checkpoint and score it (PQ, mIoU, mIoU_pan)",
        description="Load a checkpoint written by 'dearli train', predict every image of a dataset split, write "
        "the predictions as COCO panoptic (PNG + JSON) under --out, and print PQ/SQ/RQ and two mIoUs: mIoU is the "
        "model's semantic inference (per pixel, the class with the highest class × mask probability summed over "
        "queries), as detectron2 and the papers report it; mIoU_pan is the panoptic prediction turned into a "
        "semantic map, as 'dearli evaluate --semseg' scores it (lower: the panoptic output drops queries). "
        "--alpha-clip sets the weight of the zero-shot CLIP branch in the geometric ensemble "
        "(default: the checkpoint's model.ensemble.alpha_clip; 0 = decoder only).",
        epilog="example: dearli predict --checkpoint runs/sup/checkpoints/step_0002000.pt --dataset runs/synth "
        "--out runs/sup/pred_val",
    )
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint file (checkpoints/step_NNNNNNN.pt) or a registered MLflow model "
                        "(models:/dearli/3, models:/dearli/latest; store: MLFLOW_TRACKING_URI)")
    parser.add_argument("--dataset", required=True, help="dataset directory (with dataset.yaml)")
    parser.add_argument("--split", default="val", help="split to predict (default: val)")
    parser.add_argument("--out", required=True, help="new directory for the predictions")
    parser.add_argument("--alpha-clip", type=float, default=None, help="CLIP weight of the ensemble, in [0, 1]")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.add_argument("--visualize", type=int, default=4, metavar="N",
                        help="draw input | prediction | ground truth of the first N images into OUT/vis/ "
                        "(default: 4; 0 = none)")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from dearli.data.dataset import load_dataset
    from dearli.device import resolve_device
    from dearli.errors import ConfigError
    from dearli.model.m2f_lang import build_m2f_lang
    from dearli.predict.model_source import checkpoint_file
    from dearli.training.checkpoint import load_checkpoint, restore
    from dearli.training.evaluator import evaluate_model

    if args.alpha_clip is not None and not 0.0 <= args.alpha_clip <= 1.0:
        raise ConfigError(f"--alpha-clip must lie in [0, 1], got {args.alpha_clip}")
    device = resolve_device(args.device)
    checkpoint = checkpoint_file(args.checkpoint)
    payload = load_checkpoint(checkpoint, device)
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
    if args.visualize > 0:
        from dearli.evaluation.visualize import write_visualisations

        pred_json = Path(result["pred_json"])
        drawn = write_visualisations(info.split(args.split), pred_json, pred_json.parent / "panoptic",
                                     Path(args.out) / "vis", args.visualize)
        if not args.json:
            print(f"visualisations: {Path(args.out) / 'vis'} ({len(drawn)} images)")
    return 0
