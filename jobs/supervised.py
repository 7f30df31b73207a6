"""Supervised baseline: synthetic world -> M2F-Lang (preset synth, the main job's) on the labeled partition
only -> PQ / mIoU.

Runs as a plain script or as a Ray job (``ray job submit -- python jobs/supervised.py``). Everything goes
to an absolute workdir (default ``~/ray_results/dearli``, shared with ``jobs/ssl.py``: the same synthetic
world is reused), never to the job's temporary working directory. Arguments after the options are
configuration overrides, e.g. ``train.max_steps=2000``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

from dearli.job_script import prepare_job_script  # imports nothing: jobs/ leaves sys.path before ``ssl`` is imported

prepare_job_script(__file__)


def main(argv: list[str] | None = None) -> int:
    from dearli.config import DEFAULT_WORKDIR
    from dearli.pretrain.resolve import CACHE_ENV, CACHE_FOLDER
    from dearli.stages.workspace import next_run_name, resolve_workdir, synth_dataset

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None,
                        help=f"where the dataset and run directories go (default: {DEFAULT_WORKDIR})")
    parser.add_argument("--num-images", type=int, default=400, help="synthetic training images")
    parser.add_argument("--val-images", type=int, default=100, help="synthetic validation images")
    parser.add_argument("--partition", default="1_8", help="labeled partition of the synthetic world")
    parser.add_argument("--preset", default="synth",
                        help="config preset (default: synth, the main job's; synth-quick for its shorter schedule)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default: the preset's train.max_steps: 1600 for synth-quick, 3000 "
                        "for synth)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    from dearli.errors import DearliError
    from dearli.pretrain.resolve import load_resolved_config
    from dearli.training.supervised import train_supervised

    echo = functools.partial(print, flush=True)  # a Ray job's stdout is a pipe
    try:
        workdir = resolve_workdir(args.workdir)
        echo(f"workdir: {workdir}")
        dataset = synth_dataset(workdir, args.num_images, args.val_images, echo)
        # the project's CLIP (preset synth) is cached where jobs/ssl.py keeps it: trained once for both jobs
        os.environ.setdefault(CACHE_ENV, str(workdir / CACHE_FOLDER))
        # JSON strings are valid YAML scalars, so a path like "2017" stays a string.
        steps = [] if args.steps is None else [f"train.max_steps={args.steps}"]  # else the preset's
        cfg = load_resolved_config(args.preset, [f"data.dataset={json.dumps(str(dataset))}",
                                                 f"data.partition={json.dumps(args.partition)}",
                                                 *steps, *args.overrides])
        run_dir = workdir / "runs" / next_run_name(workdir / "runs", "supervised")  # never reuse a finished run
        echo(f"run directory: {run_dir}")
        result = train_supervised(cfg, run_dir)
    except DearliError as err:
        print(f"{os.path.basename(sys.argv[0])}: error: {err}", file=sys.stderr, flush=True)
        return 1
    echo(f"checkpoint: {result['checkpoint']}")
    echo(f"run directory: {run_dir} (config.yaml, metrics.jsonl, checkpoints/, eval/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
