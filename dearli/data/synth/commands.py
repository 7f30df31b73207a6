"""``dearli synth``: render the synthetic panoptic world to a dataset directory."""

from __future__ import annotations

import argparse
import sys

from dearli.errors import ConfigError

_PROGRESS_MIN_IMAGES = 200  # below this a progress bar is noise


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="render the synthetic panoptic world (coloured shapes on textured backgrounds)",
        description="Render a deterministic synthetic panoptic dataset: thing classes are coloured shapes "
        "('red circle', 'blue square', ...), stuff classes are textures ('grass', 'sky', ...). Writes COCO "
        "panoptic JSON + PNGs, semantic PNGs, classes.json, dataset.yaml with train and val splits, and "
        "nested labeled partitions 1_16 ⊂ 1_8 ⊂ 1_4. Same arguments give byte-identical output.",
    )
    parser.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    parser.add_argument("--num-images", type=int, default=1000, help="training images (default: 1000)")
    parser.add_argument("--val-images", type=int, default=None,
                        help="validation images (default: a fifth of --num-images, at least 1)")
    parser.add_argument("--seed", type=int, default=0, help="world seed, >= 0 (default: 0)")
    parser.add_argument("--size", "--image-size", dest="size", type=int, nargs="+", default=[128, 128],
                        metavar="N", help="image size: 'H W', or one number for a square (default: 128 128)")
    parser.add_argument("--image-format", choices=("png", "jpg"), default="png",
                        help="format of the RGB images (default: png, lossless)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a dataset written earlier by 'dearli synth' in --out")
    parser.set_defaults(handler=run_synth)


def _image_size(values: list[int]) -> tuple[int, int]:
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise ConfigError(f"--size takes one or two numbers (H W), got {len(values)}")


def run_synth(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from dearli.data.synth.classes import CLASSES
    from dearli.data.synth.writer import default_num_val, write_synth_dataset

    size = _image_size(args.size)
    num_val = default_num_val(args.num_images) if args.val_images is None else args.val_images
    total = args.num_images + num_val
    with tqdm(total=total, desc="synth", unit="img", file=sys.stderr,
              disable=total < _PROGRESS_MIN_IMAGES) as bar:
        root = write_synth_dataset(args.out, args.num_images, args.seed, num_val, size,
                                   overwrite=args.overwrite, image_format=args.image_format,
                                   progress=bar.update)
    things = sum(c.isthing for c in CLASSES)
    print(f"wrote {args.num_images} train + {num_val} val images of {size[0]}x{size[1]} "
          f"({len(CLASSES)} classes: {things} things, {len(CLASSES) - things} stuff) to {root}")
    return 0
