"""Main job on the embedded default: synthetic world -> supervised M2F-Lang (tiny) -> PQ / mIoU.

Runs as a plain script or as a Ray job (``ray job submit -- python jobs/supervised.py``). Arguments
after the options are configuration overrides, e.g. ``train.max_steps=2000``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs", help="where the dataset and run directories go")
    parser.add_argument("--num-images", type=int, default=400, help="synthetic training images")
    parser.add_argument("--val-images", type=int, default=100, help="synthetic validation images")
    parser.add_argument("--partition", default="1_8", help="labeled partition of the synthetic world")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=2000, help="training steps")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    from dearli.cli import main as dearli

    workdir = Path(args.workdir)
    dataset = workdir / f"synth_{args.num_images}_{args.val_images}"
    if not (dataset / "dataset.yaml").exists():
        code = dearli(["synth", "--out", str(dataset), "--num-images", str(args.num_images),
                       "--val-images", str(args.val_images), "--seed", "0"])
        if code:
            return code
    run = workdir / "supervised"
    index = 0
    while (run_dir := Path(f"{run}_{index:03d}")).exists():  # never reuse a finished run
        index += 1
    return dearli(["train", "--dataset", str(dataset), "--partition", args.partition, "--out", str(run_dir),
                   "--preset", args.preset, f"train.max_steps={args.steps}", *args.overrides])


if __name__ == "__main__":
    sys.exit(main())
