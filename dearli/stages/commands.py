"""``dearli train [supervised] | warmup | ssl``: the training stages from the command line.

``supervised`` (the default when no stage is named: ``dearli train --dataset ...``) is the single-process
labeled-only loop; ``warmup`` (DeWa) and ``ssl`` (Mean Teacher) are Ray Train programs that run on the Ray
cluster in RAY_ADDRESS, or a local one.
"""

from __future__ import annotations

import argparse
import json

STAGES = ("supervised", "warmup", "ssl")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train M2F-Lang: supervised (default), warmup (DeWa on SAM masks) or ssl (Mean Teacher)",
        description="Train the M2F-Lang model (frozen CLIP ConvNeXt + Mask2Former decoder). Stages: 'supervised' "
        "(the default) trains on the labeled images of a partition in one process; 'warmup' warms the decoder "
        "up class-agnostically on the SAM masks of every training image (Ray Train); 'ssl' runs Mean Teacher "
        "with the teacher as a Ray actor pool (Ray Train). Extra KEY=VALUE arguments override the "
        "configuration, e.g. train.max_steps=500 train.num_workers=2.",
        epilog="examples: dearli train --dataset runs/synth --partition 1_8 --out runs/sup train.max_steps=300 | "
        "dearli train warmup --dataset runs/synth --sam-cache runs/cache/sam --out runs/warmup | "
        "dearli train ssl --dataset runs/synth --partition 1_8 --init runs/warmup/checkpoints/step_0000300.pt "
        "--out runs/ssl",
    )
    stages = parser.add_subparsers(dest="stage", metavar="STAGE")
    for stage, text in (("supervised", "labeled images only, one process"),
                        ("warmup", "DeWa: class-agnostic decoder warm-up on SAM masks (Ray Train)"),
                        ("ssl", "Mean Teacher with a streaming teacher actor pool (Ray Train)")):
        sub = stages.add_parser(stage, help=text, description=text)
        _common_arguments(sub, stage)
        sub.set_defaults(handler=_run, stage=stage)


def default_stage(argv: list[str]) -> list[str]:
    """``dearli train --dataset ...`` (no stage named) means ``dearli train supervised --dataset ...``."""
    if len(argv) >= 2 and argv[0] == "train" and argv[1] not in (*STAGES, "-h", "--help"):
        return [argv[0], "supervised", *argv[1:]]
    return argv


def _common_arguments(parser: argparse.ArgumentParser, stage: str) -> None:
    parser.add_argument("--dataset", required=True, help="dataset directory (with dataset.yaml)")
    if stage != "warmup":
        parser.add_argument("--partition", default=None, help="partition name, e.g. 1_8 (default: every train "
                            "image labeled; ssl needs a partition that leaves unlabeled images)")
    if stage == "warmup":
        parser.add_argument("--sam-cache", required=True, help="SAM cache of the train split ('dearli cache sam')")
    if stage == "ssl":
        parser.add_argument("--init", default=None, help="checkpoint that starts student and teacher (the warm-up's)")
    parser.add_argument("--out", required=True, help="run directory (must be new or empty unless --resume)")
    parser.add_argument("--preset", default="tiny", help="config preset (see dearli/configs) or a YAML file")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    if stage == "supervised":
        parser.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="configuration overrides")


def _run(args: argparse.Namespace) -> int:
    from dearli.pretrain.resolve import load_resolved_config

    # JSON strings are valid YAML scalars, so a path like "2017" stays a string.
    overrides = [f"data.dataset={json.dumps(args.dataset)}", *args.overrides]
    if getattr(args, "partition", None) is not None:
        overrides.append(f"data.partition={json.dumps(args.partition)}")
    cfg = load_resolved_config(args.preset, overrides)
    if args.stage == "warmup":
        from dearli.stages.warmup import run_warmup

        result = run_warmup(cfg, args.out, args.sam_cache, resume=args.resume)
    elif args.stage == "ssl":
        from dearli.stages.mean_teacher import run_mean_teacher

        result = run_mean_teacher(cfg, args.out, init=args.init, resume=args.resume)
    else:
        from dearli.training.supervised import train_supervised

        result = train_supervised(cfg, args.out, resume=args.resume, evaluate=not args.no_eval)
    print(f"checkpoint: {result['checkpoint']}")
    return 0
