"""``dearli cache sam | clip``: build the foundation-model caches on Ray Data."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dearli.config import CacheConfig
from dearli.config_model import InferenceConfig
from dearli.runtime import add_actor_pool_arguments

_CACHE = CacheConfig()
_INFERENCE = InferenceConfig()

RESUME_NOTE = (
    "Resumable: a rerun processes only the images missing from OUT (images that failed before are retried); "
    "committed parts survive an interruption and half-written files are never read. Failures are recorded in "
    "OUT/errors/ with their reason and the job goes on. Runs on the Ray cluster in RAY_ADDRESS, or a local one."
)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, metavar="DIR", help="dataset directory (with dataset.yaml)")
    parser.add_argument("--split", default="train", help="split whose images are cached (default: train)")
    parser.add_argument("--out", required=True, metavar="URI",
                        help="cache location: a local directory or a filesystem URI such as s3://bucket/path")
    add_actor_pool_arguments(parser, "dearli_cache")
    parser.add_argument("--images-per-part", type=int, default=_CACHE.images_per_part, metavar="K",
                        help=f"images per committed part (default: {_CACHE.images_per_part})")
    parser.add_argument("--limit", type=int, default=0, metavar="N",
                        help="process at most N missing images in this run (default: all)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cache", help="precompute SAM masks or CLIP features into a Parquet cache",
        description="Precompute foundation-model outputs once, in parallel on Ray: class-agnostic SAM masks "
        "(for the warm-up and the SAM+CLIP baseline) and dense CLIP features (for the zero-shot baselines).",
    )
    sub = parser.add_subparsers(dest="cache", metavar="CACHE")
    sam = sub.add_parser(
        "sam", help="class-agnostic masks per image (SAM or Felzenszwalb)",
        description="Run SAM's automatic mask generator (or the Felzenszwalb stand-in) on every image of a "
        "split and store each mask as COCO RLE with area, box, predicted IoU and stability score. "
        + RESUME_NOTE,
    )
    _add_common(sam)
    sam.add_argument("--generator", choices=("sam", "felzenszwalb"), default="sam",
                     help="sam (needs --sam-checkpoint) or felzenszwalb (classical, CPU, no weights)")
    sam.add_argument("--sam-type", choices=("vit_b", "vit_l", "vit_h", "tiny"), default=_CACHE.sam_type,
                     help="SAM size matching the checkpoint; 'tiny' is a random toy model for tests")
    sam.add_argument("--sam-checkpoint", default=_CACHE.sam_checkpoint, metavar="PATH",
                     help="SAM weights file (e.g. sam_vit_h_4b8939.pth)")
    sam.add_argument("--points-per-side", type=int, default=_CACHE.points_per_side, metavar="N",
                     help=f"point-prompt grid is N×N (default: {_CACHE.points_per_side})")
    sam.add_argument("--points-per-batch", type=int, default=_CACHE.points_per_batch, metavar="B",
                     help=f"prompts per decoder call; memory only (default: {_CACHE.points_per_batch})")
    sam.add_argument("--pred-iou-thresh", type=float, default=_CACHE.pred_iou_thresh, metavar="T",
                     help=f"drop masks with a lower predicted IoU (default: {_CACHE.pred_iou_thresh})")
    sam.add_argument("--stability-score-thresh", type=float, default=_CACHE.stability_score_thresh, metavar="T",
                     help=f"drop masks with a lower stability score (default: {_CACHE.stability_score_thresh})")
    sam.set_defaults(handler=run_sam)

    clip = sub.add_parser(
        "clip", help="dense CLIP features per image + class text embeddings",
        description="Run the frozen CLIP ConvNeXt on every image of a split at the test-time scale and store "
        "its dense feature map (clip_vis_dense, before CLIP's head, float16) with the resize scale and padding, "
        "plus the text embeddings of the dataset's class names (OUT/text.parquet). " + RESUME_NOTE,
    )
    _add_common(clip)
    clip.add_argument("--preset", default=None, metavar="NAME",
                      help="take model, weights and test scale from a config preset (e.g. tiny)")
    clip.add_argument("--model", default=None, metavar="NAME", help="open_clip model name (e.g. convnext_large_d_320)")
    clip.add_argument("--pretrained", default=None, metavar="TAG_OR_PATH",
                      help="open_clip pretrained tag or local checkpoint; '' = random weights")
    clip.add_argument("--short-side", type=int, default=None, metavar="S",
                      help=f"test-time shortest edge (default: the preset's, else {_INFERENCE.test_short_side})")
    clip.add_argument("--max-size", type=int, default=None, metavar="M",
                      help=f"cap on the longest edge (default: the preset's, else {_INFERENCE.test_max_size})")
    clip.set_defaults(handler=run_clip)
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)


def image_rows(dataset: str, split: str) -> tuple[Any, list[dict[str, Any]]]:
    """(DatasetInfo, rows {image_id, stem, image_path, height, width}) of one split."""
    from dearli.data.dataset import load_dataset

    # Absolute paths: the actors of a cluster run in other working directories.
    info = load_dataset(Path(dataset).expanduser().resolve())
    rows = [{"image_id": str(r.image_id), "stem": r.stem, "image_path": str(r.image_path),
             "height": int(r.height), "width": int(r.width)} for r in info.split(split).records]
    return info, rows


@dataclass(frozen=True)
class PoolOptions:
    """How a cache job runs (none of it changes what is cached): actors, their GPUs and resources, images per
    committed part, an image limit, the largest image, Ray's verbosity."""

    actors: int = 1
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    resources: dict[str, float] = field(default_factory=dict)
    images_per_part: int = _CACHE.images_per_part
    limit: int = 0
    max_pixels: int | None = None
    verbose: bool = False

    def validate(self) -> None:
        from dearli.errors import ConfigError

        if self.actors < 1 or self.images_per_part < 1 or self.limit < 0:
            raise ConfigError("--actors and --images-per-part must be positive, --limit >= 0")

    def job_kwargs(self, echo: Any) -> dict[str, Any]:
        return {"actors": self.actors, "gpus_per_actor": self.gpus_per_actor, "resources": self.resources,
                "images_per_part": self.images_per_part, "limit": self.limit, "verbose": self.verbose, "echo": echo}

    def worker_extra(self) -> dict[str, Any]:
        return {} if self.max_pixels is None else {"max_pixels": self.max_pixels}


def _pool_options(args: argparse.Namespace) -> PoolOptions:
    options = PoolOptions(actors=args.actors, gpus_per_actor=args.gpus_per_actor,
                          resources=parse_resources(args.resources), images_per_part=args.images_per_part,
                          limit=args.limit, max_pixels=args.max_pixels, verbose=args.verbose)
    options.validate()
    return options


def parse_resources(text: str | None) -> dict[str, float]:
    """``--resources`` JSON -> {resource name: amount}; anything else is a one-line ConfigError."""
    import json

    from dearli.errors import ConfigError

    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as err:
        raise ConfigError(f"--resources: not JSON ({err}); give e.g. '{{\"dearli_cache\": 1}}'") from err
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, (int, float)) and v > 0
                                              for k, v in value.items()):
        raise ConfigError(f"--resources: must map resource names to positive numbers, got {text}")
    return {k: float(v) for k, v in value.items()}


def _report(kind: str, uri: str, summary: Any, echo: Any = print) -> int:
    echo(f"{kind} cache {summary.line(uri)}")
    for stem, reason in summary.failures[:20]:
        echo(f"  failed {stem}: {reason}")
    if summary.failed:
        echo(f"  all failures: {uri.rstrip('/')}/errors/ (dearli.caches.readers.CacheReader.errors())")
    return 0


def run_sam(args: argparse.Namespace) -> int:
    from dearli.caches.generators import GeneratorSpec

    # The actors load the weights: on a cluster that is another node, in another working directory.
    checkpoint = str(Path(args.sam_checkpoint).expanduser().resolve()) if args.sam_checkpoint else ""
    spec = GeneratorSpec(kind=args.generator, sam_type=args.sam_type, sam_checkpoint=checkpoint,
                         points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
                         pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_score_thresh)
    return build_sam_cache(args.dataset, args.split, args.out, spec, _pool_options(args))


def build_sam_cache(dataset: str | Path, split: str, out: str, spec: Any, pool: PoolOptions = PoolOptions(),
                    echo: Any = print) -> int:
    """``dearli cache sam`` as a function: the masks of ``spec`` (a GeneratorSpec) for every image of
    ``split`` missing from ``out``; prints the summary and the images without masks; returns 0."""
    import dataclasses

    from dearli.caches.job import run_cache_job
    from dearli.caches.workers import SamWorker

    spec.validate()
    spec.check_weights()
    _, rows = image_rows(str(dataset), split)
    worker_kwargs = {"spec": dataclasses.asdict(spec), **pool.worker_extra()}
    summary = run_cache_job(out, "sam", spec.settings(), rows, SamWorker, worker_kwargs, **pool.job_kwargs(echo))
    status = _report("sam", out, summary, echo)
    _report_empty(out, echo)
    return status


def _report_empty(uri: str, echo: Any = print) -> None:
    """Say which cached images hold no mask: a SAM whose checkpoint does not fit --sam-type, or thresholds
    no mask passes, would otherwise leave the warm-up nothing to learn without a word."""
    from dearli.caches.readers import read_sam_cache, without_masks

    reader = read_sam_cache(uri)
    empty = without_masks(reader)
    if not empty:
        return
    shown = ", ".join(empty[:10]) + (f", ... ({len(empty) - 10} more)" if len(empty) > 10 else "")
    echo(f"sam cache {uri}: WARNING {len(empty)} of {len(reader)} images hold no mask ({shown}); "
          "if that is most of them, check --sam-checkpoint against --sam-type, or lower --pred-iou-thresh "
          "and --stability-score-thresh")


def clip_settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Model and test scale from --preset, overridden by --model/--pretrained/--short-side/--max-size."""
    from dearli.caches.clip_features import clip_settings
    from dearli.errors import ConfigError
    from dearli.pretrain.resolve import load_resolved_config

    model = load_resolved_config(args.preset).model if args.preset else None
    name = args.model or (model.backbone.clip_model if model else None)
    pretrained = args.pretrained if args.pretrained is not None else (model.backbone.pretrained if model else None)
    if not name or pretrained is None:
        raise ConfigError("dearli cache clip: give --model and --pretrained, or --preset")
    inference = model.inference if model else _INFERENCE
    return clip_settings(name, pretrained, args.short_side or inference.test_short_side,
                         args.max_size or inference.test_max_size, inference.size_divisibility)


def run_clip(args: argparse.Namespace) -> int:
    return build_clip_cache(args.dataset, args.split, args.out, clip_settings_from_args(args), _pool_options(args))


def build_clip_cache(dataset: str | Path, split: str, out: str, settings: dict[str, Any],
                     pool: PoolOptions = PoolOptions(), echo: Any = print) -> int:
    """``dearli cache clip`` as a function: dense CLIP features of ``settings`` (see
    :func:`dearli.caches.clip_features.clip_settings`) for every image of ``split`` missing from ``out``, and
    the text table of the dataset's classes; prints the summary; returns 0."""
    from dearli.caches.clip_features import write_text_table
    from dearli.caches.job import run_cache_job
    from dearli.caches.store import CacheStore
    from dearli.caches.workers import ClipWorker

    info, rows = image_rows(str(dataset), split)
    # Check the location and the class list before spending any compute on images.
    CacheStore(out).open_for_writing("clip", settings)
    write_text_table(out, settings, info.categories)
    worker_kwargs = {"settings": settings, **pool.worker_extra()}
    summary = run_cache_job(out, "clip", settings, rows, ClipWorker, worker_kwargs, **pool.job_kwargs(echo))
    return _report("clip", out, summary, echo)
