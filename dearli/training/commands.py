"""``dearli train``: supervised training of M2F-Lang on a labeled partition, then evaluation."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train M2F-Lang supervised on a labeled partition and evaluate it",
        description="Train the M2F-Lang model (frozen CLIP ConvNeXt + Mask2Former decoder) on the labeled images "
        "of a dataset partition, save checkpoints and config.yaml under --out, then evaluate PQ and mIoU on "
        "the validation split. Extra KEY=VALUE arguments override the configuration, e.g. "
        "train.max_steps=500 optim.lr=2e-4.",
        epilog="example: dearli train --dataset runs/synth --partition 1_8 --out runs/sup --preset tiny "
        "train.max_steps=300",
    )
    parser.add_argument("--dataset", required=True, help="dataset directory (with dataset.yaml)")
    parser.add_argument("--partition", default=None, help="partition name, e.g. 1_8 (default: every train image)")
    parser.add_argument("--out", required=True, help="run directory (must be new or empty unless --resume)")
    parser.add_argument("--preset", default="tiny", help="config preset (tiny, base, large) or a YAML file")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="configuration overrides")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from dearli.config import load_config
    from dearli.training.supervised import train_supervised

    # JSON strings are valid YAML scalars, so a path like "2017" stays a string.
    overrides = [f"data.dataset={json.dumps(args.dataset)}", *args.overrides]
    if args.partition is not None:
        overrides.append(f"data.partition={json.dumps(args.partition)}")
    cfg = load_config(args.preset, overrides)
    result = train_supervised(cfg, args.out, resume=args.resume, evaluate=not args.no_eval)
    print(f"checkpoint: {result['checkpoint']}")
    return 0
