"""``dearli pretrain-clip``: pre-train the small CLIP on the synthetic world's pretrain stream."""

from __future__ import annotations

import argparse

from dearli.pretrain.clip import PretrainOptions
from dearli.pretrain.pairs import PairOptions

_DEFAULTS = PretrainOptions()
_PAIRS = PairOptions()


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretrain-clip", help="pre-train the small CLIP on image-caption pairs of the synthetic world",
        description="Contrastive pre-training (open_clip's ClipLoss) of an open_clip model on image-caption "
        "pairs of the synthetic world's 'pretrain' stream (whole scenes and class-balanced crops centred on "
        "objects; never a train or val image). Writes an open_clip checkpoint: pass it as "
        "model.backbone.pretrained=CKPT. With --cache-dir the file is named by a hash of the settings and "
        "trained only if missing; --out copies nothing and never replaces an existing file.",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", metavar="CKPT", help="new checkpoint file (must not exist)")
    target.add_argument("--cache-dir", metavar="DIR",
                        help="content-addressed cache: print the checkpoint for these settings, training it if missing")
    parser.add_argument("--model", default=_DEFAULTS.model, help=f"open_clip model (default: {_DEFAULTS.model})")
    parser.add_argument("--steps", type=int, default=_DEFAULTS.steps, help=f"steps (default: {_DEFAULTS.steps})")
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="seed of the init and the pair stream")
    parser.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size,
                        help=f"pairs per step (default: {_DEFAULTS.batch_size})")
    parser.add_argument("--lr", type=float, default=_DEFAULTS.lr, help=f"peak learning rate (default: {_DEFAULTS.lr})")
    parser.add_argument("--image-size", type=int, default=_PAIRS.image_size,
                        help=f"training resolution, pixels (default: {_PAIRS.image_size})")
    parser.add_argument("--crop-prob", type=float, default=_PAIRS.crop_prob,
                        help=f"share of object-centred crops among the pairs (default: {_PAIRS.crop_prob})")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--eval-images", type=int, default=0, metavar="N",
                        help="afterwards, print zero-shot recognition on N validation scenes (default: 0 = skip)")
    parser.set_defaults(handler=run_pretrain_clip)


def options_from_args(args: argparse.Namespace) -> PretrainOptions:
    """The PretrainOptions the command line asks for (ConfigError on impossible values)."""
    import dataclasses


    pairs = dataclasses.replace(_PAIRS, image_size=args.image_size, crop_prob=args.crop_prob)
    options = dataclasses.replace(_DEFAULTS, model=args.model, steps=args.steps, seed=args.seed,
                                  batch_size=args.batch_size, lr=args.lr, pairs=pairs)
    options.validate()
    return options


def _print_log(step: int, metrics: dict) -> None:
    print(f"step {step}: loss {metrics['loss']:.4f}, lr {metrics['lr']:.2e}, "
          f"temperature scale {metrics['logit_scale']:.1f}, {metrics['seconds']:.0f} s", flush=True)


def run_pretrain_clip(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from dearli.errors import DataError
    from dearli.pretrain.checkpoint import ensure_pretrained_clip, write_checkpoint
    from dearli.pretrain.clip import train_clip

    options = options_from_args(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.out:
        if Path(args.out).exists():
            raise DataError(args.out, "exists already; choose a new file name (or use --cache-dir)")
        path = write_checkpoint(train_clip(options, log=_print_log), options, args.out)
    else:
        path = ensure_pretrained_clip(args.cache_dir, options=options, log=_print_log)
    print(f"checkpoint: {path}")
    if args.eval_images > 0:
        _print_evaluation(options.model, str(path), args.eval_images, options.pairs.image_size)
    return 0


def _print_evaluation(model: str, path: str, num_images: int, crop_size: int) -> None:
    """Zero-shot figures of the new checkpoint; thing crops at the size the CLIP was trained at."""
    from dearli.config_model import BackboneConfig
    from dearli.model.backbone import build_backbone
    from dearli.pretrain.zero_shot_check import zero_shot_report

    report = zero_shot_report(build_backbone(BackboneConfig(clip_model=model, pretrained=path)),
                              num_images=num_images, crop_size=crop_size)
    print(f"zero-shot on {num_images} validation scenes (ground-truth masks, dense pooling at 128 px): "
          f"things {100 * report['mask128_things']:.1f}%, stuff {100 * report['mask128_stuff']:.1f}%, "
          f"thing crops {100 * report['crop_things']:.1f}%, chance {100 * report['chance']:.1f}%")
