"""The ``dearli`` console command.

Each command group lives beside the code it drives, in a module with a ``register(subparsers)``
function that adds its parser and sets ``handler`` (a function taking the parsed args and returning
an exit code). Command modules import heavy libraries (torch, ray) inside their handlers, so
``dearli --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from dearli.config import OVERRIDE
from dearli.errors import DearliError

# Modules that register top-level subcommands, in the order --help lists them.
COMMAND_MODULES = (
    "dearli.data.synth.commands",  # dearli synth
    "dearli.data.commands",  # dearli data prepare-ade20k | prepare-coco-objects | check
    "dearli.evaluation.commands",  # dearli evaluate
    "dearli.stages.commands",  # dearli train [supervised] | warmup | ssl
    "dearli.predict.commands.predict",  # dearli predict
    "dearli.predict.commands.pseudo_label",  # dearli pseudo-label
    "dearli.predict.commands.suggest",  # dearli suggest
    "dearli.predict.commands.serve",  # dearli serve
    "dearli.predict.commands.review",  # dearli review
    "dearli.annotation.commands",  # dearli export label-studio | import label-studio
    "dearli.caches.commands",  # dearli cache sam | clip
    "dearli.baselines.commands",  # dearli baseline sam-clip | oracle
    "dearli.pretrain.commands",  # dearli pretrain-clip
    "dearli.bench.commands",  # dearli bench evaluate | step | cache | ssl | ablation | gpu
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dearli",
        description="Semi-supervised panoptic segmentation with DEARLi: a Mask2Former decoder on a frozen "
        "OpenCLIP ConvNeXt, warmed up on SAM masks, trained with Mean Teacher. Run "
        "'dearli COMMAND --help' for the options of a command.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # a missing dependency inside the module is a real error
                raise
            continue
        module.register(subparsers)
    return parser


def prepare_argv(argv: Sequence[str]) -> list[str]:
    """The arguments as the parser takes them: ``dearli train --dataset ...`` names its default stage."""
    argv = list(argv)
    if argv[:1] == ["train"]:
        from dearli.stages.commands import default_stage

        argv = default_stage(argv)
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = prepare_argv(sys.argv[1:] if argv is None else argv)
    # KEY=VALUE overrides may come anywhere after the command, also after options (argparse alone
    # stops collecting positionals at the first option).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or not all(OVERRIDE.match(token) for token in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except DearliError as err:
        print(f"dearli {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dearli {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
