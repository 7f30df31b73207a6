"""``dearli pseudo-label``: label a pool of images with a trained checkpoint on a Ray Data actor pool."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dearli.config import CacheConfig
from dearli.runtime import add_actor_pool_arguments

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_CACHE = CacheConfig()


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pseudo-label", help="label a pool of images with a trained checkpoint (COCO panoptic + Parquet)",
        description="Run the teacher's test-time path (with the zero-shot CLIP ensemble) over many images on a "
        "Ray Data actor pool and write COCO panoptic pseudo-labels: OUT/panoptic/<stem>.png, OUT/panoptic.json, "
        "OUT/segments.parquet (one row per segment with its class score) and OUT/errors.parquet (images that "
        "could not be read, with the reason; the job goes on). An output disk that is full or not writable "
        "stops the job. Resumable: a rerun labels only the images missing from OUT, and a killed or stopped "
        "run rerun ends with every image exactly once. --classes takes any "
        "class list: the model classifies by CLIP text embeddings of the names, so new names need no "
        "retraining. Runs on the Ray cluster in RAY_ADDRESS, or a local one.",
        epilog="example: dearli pseudo-label --checkpoint runs/sup/checkpoints/step_0002000.pt "
        "--images runs/synth/images/train --out runs/pseudo --actors 2",
    )
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint file (checkpoints/step_NNNNNNN.pt) or a registered MLflow model "
                        "(models:/dearli/3; store: MLFLOW_TRACKING_URI)")
    parser.add_argument("--images", required=True, metavar="DIR_OR_LIST",
                        help="a directory (its .jpg/.jpeg/.png files) or a text file with one image path per "
                        "line (relative paths are relative to the file's directory)")
    parser.add_argument("--out", required=True, metavar="URI",
                        help="output location: a new or earlier pseudo-label directory, or a URI such as s3://...")
    parser.add_argument("--classes", default=None, metavar="FILE",
                        help="class list in the classes.json format ([{id, name, isthing}], names may list "
                        "synonyms: 'person,child'); default: the classes of the checkpoint's dataset")
    parser.add_argument("--min-score", type=float, default=0.0, metavar="S",
                        help="drop segments whose class score is below S, leaving their pixels unlabeled "
                        "(default: 0, keep all)")
    parser.add_argument("--alpha-clip", type=float, default=None, metavar="A",
                        help="CLIP weight of the ensemble in [0, 1] (default: the checkpoint's "
                        "model.ensemble.alpha_clip)")
    add_actor_pool_arguments(parser, "gpu_node")
    parser.add_argument("--batch-size", type=int, default=_CACHE.images_per_part, metavar="B",
                        help=f"images per actor call and per committed part (default: {_CACHE.images_per_part})")
    parser.set_defaults(handler=_run)


def list_images(source: str | Path) -> list[dict[str, Any]]:
    """Image rows {image_id, stem, image_path, height 0, width 0} of a directory or a list file.

    Outputs are named by file stem, so two images with one stem are an error naming both.
    """
    from dearli.errors import DataError

    source = Path(source).expanduser().resolve()
    if source.is_dir():
        paths = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    elif source.is_file():
        lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines()]
        paths = [p if p.is_absolute() else source.parent / p
                 for p in (Path(line).expanduser() for line in lines if line and not line.startswith("#"))]
    else:
        raise DataError(source, "not found: give a directory of images or a text file listing image paths")
    if not paths:
        raise DataError(source, f"no images ({', '.join(IMAGE_SUFFIXES)}) found")
    rows, seen = [], {}
    for path in paths:
        if path.stem in seen:
            raise DataError(source, f"two images named '{path.stem}' ({seen[path.stem]} and {path}); "
                                    "outputs are named by file stem")
        seen[path.stem] = path
        rows.append({"image_id": path.stem, "stem": path.stem, "image_path": str(path), "height": 0, "width": 0})
    return rows


def _check_options(args: argparse.Namespace) -> None:
    from dearli.caches.store import MANIFEST, is_temporary
    from dearli.errors import ConfigError, DataError

    if not 0.0 <= args.min_score <= 1.0 or (args.alpha_clip is not None and not 0.0 <= args.alpha_clip <= 1.0):
        raise ConfigError("--min-score and --alpha-clip must lie in [0, 1]")
    if args.actors < 1 or args.batch_size < 1:
        raise ConfigError("--actors and --batch-size must be positive")
    out = Path(args.out).expanduser()
    # A killed first run may leave only the temporary file of its manifest: that is not someone's folder.
    if "://" not in args.out and out.is_dir() and not (out / MANIFEST).is_file() and \
            any(not is_temporary(p.name) for p in out.iterdir()):
        raise DataError(out, "is not empty and holds no pseudo-labels of an earlier run; choose a new --out")


def _report(out: str, summary: Any, counts: dict[str, Any]) -> None:
    root = out.rstrip("/")
    print(f"pseudo-label {root}: {summary.total} images: {summary.done} labelled, {summary.skipped} skipped "
          f"(labelled before), {summary.failed} failed")
    print(f"  {counts['images']} images with {counts['segments']} segments: {root}/panoptic.json, "
          f"{root}/panoptic/, {root}/segments.parquet")
    for stem, reason in summary.failures[:20]:
        print(f"  failed {stem}: {reason}")
    if counts["failed"]:
        print(f"  {counts['failed']} unreadable images: {root}/errors.parquet")


def _run(args: argparse.Namespace) -> int:
    from dearli.caches.commands import parse_resources
    from dearli.errors import DataError
    from dearli.predict.job import run_pseudo_label_job
    from dearli.predict.model_source import checkpoint_digest, checkpoint_file, resolve_classes
    from dearli.predict.outputs import PANOPTIC_DIR, assemble
    from dearli.training.checkpoint import load_checkpoint

    _check_options(args)
    resources = parse_resources(args.resources)
    checkpoint = checkpoint_file(args.checkpoint)
    payload = load_checkpoint(checkpoint)
    categories = resolve_classes(args.classes, payload["config"])
    rows = list_images(args.images)
    alpha = payload["config"].model.ensemble.alpha_clip if args.alpha_clip is None else args.alpha_clip
    classes = [c.to_dict() for c in categories.categories]
    settings = {"checkpoint_sha256": checkpoint_digest(checkpoint), "alpha_clip": float(alpha),
                "min_score": float(args.min_score), "classes": classes}
    summary = run_pseudo_label_job(args.out, rows, payload, classes, settings, min_score=args.min_score,
                                   alpha_clip=alpha, actors=args.actors, gpus_per_actor=args.gpus_per_actor,
                                   batch_size=args.batch_size, max_pixels=args.max_pixels, resources=resources,
                                   verbose=args.verbose)
    counts = assemble(args.out, categories, summary.run_id)
    _report(args.out, summary, counts)
    if counts["missing"]:
        lost = counts["missing"]
        raise DataError(f"{args.out.rstrip('/')}/{PANOPTIC_DIR}", f"{len(lost)} labelled image(s) had lost their "
                        f"PNG ({', '.join(lost[:5])}{' ...' if len(lost) > 5 else ''}); they are marked not done: "
                        "rerun to label them again")
    return 0
