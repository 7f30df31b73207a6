"""Write a SynthWorld dataset to disk in the dearli dataset layout (COCO panoptic + semantic PNGs).

Layout under the output directory (all paths in the metadata are relative to it)::

    dataset.yaml  classes.json
    images/{train,val}/<stem>.png|jpg
    annotations/panoptic_{train,val}.json  annotations/panoptic_{train,val}/<stem>.png
    annotations/semantic_{train,val}/<stem>.png
    partitions/{1_16,1_8,1_4}/labeled.txt  partitions/val.txt (shared by all partitions)

Stems are ``train_000000`` / ``val_000000``; the JSON image id is the integer index within the split.
The output is a pure function of the arguments, byte for byte.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from dearli.data.coco_format import id2rgb
from dearli.data.synth.classes import classes_json, coco_categories
from dearli.data.synth.world import DEFAULT_IMAGE_SIZE, SynthSample, SynthWorld
from dearli.errors import ConfigError, DataError

GENERATOR_VERSION = 1  # bump when a change to the generator changes its output for the same arguments
PARTITION_FRACTIONS = {"1_16": 16, "1_8": 8, "1_4": 4}  # name -> labeled share 1/N of the train split
IMAGE_FORMATS = ("png", "jpg")
JPEG_QUALITY = 95
_MARKER = "# Synthetic panoptic world written by 'dearli synth'."
OWNER_FILE = ".dearli-synth"  # marks a directory whose dataset files --overwrite may replace
_PARTITION_SEED_TAG = 7  # separates the partition shuffle from the image streams of the same seed
# Entries this writer owns; --overwrite removes exactly these, and only from a directory it wrote.
_OWNED = ("dataset.yaml", "classes.json", "images", "annotations", "partitions")

Progress = Callable[[int], None]


def default_num_val(num_images: int) -> int:
    """Validation images when not given: a fifth of the training set, at least one."""
    return max(1, num_images // 5)


def _prepare_dir(out: Path, overwrite: bool) -> None:
    """Create ``out`` or check it may be written: empty, or (with overwrite) a previous synth output."""
    if out.exists() and not out.is_dir():
        raise DataError(out, "exists and is not a directory")
    # Visible names first, so the message names something the user will recognise.
    entries = sorted((p.name for p in out.iterdir()), key=lambda n: (n.startswith("."), n)) if out.exists() else []
    if entries and not overwrite:
        raise DataError(out, f"directory is not empty ({len(entries)} entries, e.g. {entries[0]!r}); "
                             "choose an empty or new directory, or pass --overwrite to replace a dataset "
                             "written earlier by 'dearli synth'")
    owned = [name for name in _OWNED if (out / name).exists()]
    if owned and not (out / OWNER_FILE).is_file():
        raise DataError(out, f"holds {', '.join(owned)} not written by 'dearli synth'; refusing to replace "
                             "them, choose another directory")
    for name in owned + ([OWNER_FILE] if owned else []):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    # Written first, so even an interrupted run can later be replaced with --overwrite.
    (out / OWNER_FILE).write_text(_MARKER + "\n")


def _save_image(sample: SynthSample, path: Path, image_format: str) -> None:
    if image_format == "jpg":
        Image.fromarray(sample.image).save(path, format="JPEG", quality=JPEG_QUALITY)
    else:
        Image.fromarray(sample.image).save(path, format="PNG")


def _write_split(world: SynthWorld, out: Path, split: str, count: int, image_format: str,
                 progress: Progress | None) -> list[str]:
    """Render and write one split; returns its stems in order."""
    width = max(6, len(str(count - 1)))
    dirs = {key: out / rel for key, rel in (("image", f"images/{split}"), ("pan", f"annotations/panoptic_{split}"),
                                            ("sem", f"annotations/semantic_{split}"))}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    images, annotations, stems = [], [], []
    for index in range(count):
        stem = f"{split}_{index:0{width}d}"
        sample = world.sample(index, stream=split)
        _save_image(sample, dirs["image"] / f"{stem}.{image_format}", image_format)
        Image.fromarray(id2rgb(sample.segment_map)).save(dirs["pan"] / f"{stem}.png", format="PNG")
        Image.fromarray(sample.semantic_map()).save(dirs["sem"] / f"{stem}.png", format="PNG")
        height, width_px = world.image_size
        images.append({"id": index, "file_name": f"{stem}.{image_format}", "height": height,
                       "width": width_px, "caption": sample.caption})
        annotations.append({"image_id": index, "file_name": f"{stem}.png", "segments_info": sample.segments})
        stems.append(stem)
        if progress is not None:
            progress(1)
    info = {"description": "dearli synthetic panoptic world", "split": split, "seed": world.seed,
            "image_size": list(world.image_size), "generator_version": GENERATOR_VERSION}
    panoptic = {"info": info, "images": images, "annotations": annotations, "categories": coco_categories()}
    (out / "annotations" / f"panoptic_{split}.json").write_text(json.dumps(panoptic) + "\n")
    return stems


def _partition_line(split: str, stem: str, image_format: str) -> str:
    return f"images/{split}/{stem}.{image_format} annotations/semantic_{split}/{stem}.png\n"


def _write_partitions(out: Path, seed: int, train: list[str], val: list[str], image_format: str) -> None:
    """Nested labeled subsets: one seeded shuffle of the train stems; each partition takes a prefix."""
    order = np.random.default_rng([seed, _PARTITION_SEED_TAG]).permutation(len(train))
    val_text = "".join(_partition_line("val", stem, image_format) for stem in val)
    root = out / "partitions"
    root.mkdir(parents=True, exist_ok=True)
    (root / "val.txt").write_text(val_text)
    for name, denominator in PARTITION_FRACTIONS.items():
        count = max(1, math.ceil(len(train) / denominator))
        lines = [_partition_line("train", train[i], image_format) for i in order[:count]]
        (root / name).mkdir()
        (root / name / "labeled.txt").write_text("".join(lines))


def _write_metadata(out: Path, seed: int, num_images: int, num_val: int, world: SynthWorld) -> None:
    (out / "classes.json").write_text(json.dumps(classes_json(), indent=1) + "\n")
    splits = {
        split: {"image_dir": f"images/{split}", "panoptic_json": f"annotations/panoptic_{split}.json",
                "panoptic_dir": f"annotations/panoptic_{split}", "semantic_dir": f"annotations/semantic_{split}"}
        for split in ("train", "val")}
    spec = {"name": "synth", "classes": "classes.json", "splits": splits, "partitions": "partitions"}
    height, width = world.image_size
    header = (f"{_MARKER}\n# seed={seed} num_images={num_images} num_val={num_val} size={height}x{width} "
              f"generator_version={GENERATOR_VERSION}\n")
    (out / "dataset.yaml").write_text(header + yaml.safe_dump(spec, sort_keys=False))


def write_synth_dataset(out_dir: str | Path, num_images: int, seed: int, num_val: int | None = None,
                        image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE, *, overwrite: bool = False,
                        image_format: str = "png", progress: Progress | None = None) -> Path:
    """Render a synthetic panoptic dataset with train and val splits and nested partitions.

    Args:
        out_dir: destination; must be empty or absent (or, with ``overwrite``, hold an earlier synth output).
        num_images: training images (>= 1).
        seed: world seed (>= 0); the output is identical for identical arguments.
        num_val: validation images (>= 1); default ``default_num_val(num_images)``.
        image_size: (H, W).
        image_format: "png" (lossless) or "jpg".
        progress: called with 1 after each written image.
    Returns:
        The dataset root (``out_dir`` as a Path).
    Raises:
        ConfigError on bad arguments, DataError if ``out_dir`` may not be written.
    """
    num_val = default_num_val(num_images) if num_val is None else num_val
    if num_images < 1 or num_val < 1:
        raise ConfigError(f"need at least one train and one val image, got num_images={num_images}, "
                          f"num_val={num_val}")
    if image_format not in IMAGE_FORMATS:
        raise ConfigError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    try:
        world = SynthWorld(seed, tuple(image_size))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    out = Path(out_dir)
    _prepare_dir(out, overwrite)
    train = _write_split(world, out, "train", num_images, image_format, progress)
    val = _write_split(world, out, "val", num_val, image_format, progress)
    _write_partitions(out, seed, train, val, image_format)
    # dataset.yaml last: a directory interrupted mid-write is recognisably incomplete.
    _write_metadata(out, seed, num_images, num_val, world)
    return out
