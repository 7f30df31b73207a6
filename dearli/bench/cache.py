"""``dearli bench cache``: SAM-cache throughput on Ray with 1, 2, ... actors (GPU actors where the cluster
has GPUs).

Synthetic images (smooth colour blobs) are written to a temporary directory and cached into a fresh cache
per run; throughput is images / wall-clock seconds of the whole job, so it includes each run's fixed cost of
starting the actors and loading the generator (use more images to dilute it). One untimed run first (Ray's
worker processes and the imports), then ``--repeats`` rounds over the actor counts in turn (1, 2, 1, 2, ...,
so a drift of the machine's speed falls on every count); each count's median with its minimum and maximum.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from dearli.bench.spread import Spread

GENERATORS = ("felzenszwalb", "sam-tiny")


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    parser = bench_subparsers.add_parser(
        "cache", help="SAM-cache throughput (images/s) with 1 and 2 actors",
        description="Cache synthetic images with a mask generator on a local Ray instance, once per actor "
        "count, and print images/s for each and the speed-up over the first count.",
    )
    parser.add_argument("--num-images", type=int, default=32, help="images per run (default: 32)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default: 256)")
    parser.add_argument("--generator", choices=GENERATORS, default="felzenszwalb",
                        help="felzenszwalb (classical) or sam-tiny (tiny random SAM, the real SAM code path); "
                        "--sam-type picks a real SAM instead")
    parser.add_argument("--sam-type", choices=("vit_b", "vit_l", "vit_h"), default=None,
                        help="a real SAM through `dearli cache sam`'s loading code: --sam-checkpoint, else random "
                        "weights saved to a temporary file (the cost does not depend on the weights)")
    parser.add_argument("--sam-checkpoint", default=None, metavar="FILE", help="SAM weights for --sam-type")
    parser.add_argument("--points-per-side", type=int, default=32, help="SAM point grid (default: 32)")
    parser.add_argument("--gpus-per-actor", type=float, default=None, metavar="G",
                        help="GPUs per actor (default: 1 if the cluster has GPUs, else 0 = CPU)")
    parser.add_argument("--actors", default="1,2", help="comma-separated actor counts (default: 1,2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per actor count (default: 3)")
    parser.set_defaults(handler=run_bench_cache)


def _write_images(folder: Path, count: int, size: int) -> list[dict]:
    import numpy as np
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        noise = rng.random((size // 8, size // 8, 3))
        image = np.kron(noise, np.ones((8, 8, 1)))
        image = gaussian_filter(image, sigma=(4, 4, 0)) * 255
        path = folder / f"bench{i:04d}.png"
        Image.fromarray(image.astype(np.uint8)).save(path)
        rows.append({"image_id": str(i), "stem": path.stem, "image_path": str(path), "height": size, "width": size})
    return rows


def run_bench_cache(args: argparse.Namespace) -> int:
    import dataclasses

    from dearli.caches.job import run_cache_job
    from dearli.caches.workers import SamWorker
    from dearli.errors import ConfigError
    from dearli.runtime import default_gpus_per_actor, ray_session

    try:
        counts = [int(v) for v in args.actors.split(",") if v.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1 or args.num_images < 1 or args.repeats < 1:
        raise ConfigError("--actors must list positive integers (e.g. 1,2); --num-images and --repeats must be "
                          "positive")
    with ray_session(), tempfile.TemporaryDirectory(prefix="dearli-bench-cache-") as tmp:
        spec = _spec(args, Path(tmp))
        gpus = default_gpus_per_actor() if args.gpus_per_actor is None else args.gpus_per_actor
        print(f"{_name(args)} on {'GPU' if gpus > 0 else 'CPU'} actors ({gpus:g} GPU each)")
        rows = _write_images(Path(tmp), args.num_images, args.size)
        runs = iter(range(10**6))

        def rate(n: int) -> float:
            # Several parts per actor so the pool can balance the load.
            start = time.perf_counter()
            summary = run_cache_job(str(Path(tmp) / f"cache-{next(runs)}"), "sam", spec.settings(), rows, SamWorker,
                                    {"spec": dataclasses.asdict(spec)}, actors=n, gpus_per_actor=gpus,
                                    images_per_part=max(1, args.num_images // (4 * n)))
            return summary.done / (time.perf_counter() - start)

        rate(counts[0])  # untimed: Ray's workers start and import once
        timed: dict[int, list[float]] = {n: [] for n in counts}
        for _ in range(args.repeats):
            for n in counts:
                timed[n].append(rate(n))
    spreads = {n: Spread.of(values) for n, values in timed.items()}
    for n, spread in spreads.items():
        print(f"{_name(args)}, {n} actor(s): {spread.text()} images/s ({args.num_images} images of {args.size}² a run)")
    for n in counts[1:]:
        print(f"speed-up {n} vs {counts[0]} actor(s): {spreads[n].median / spreads[counts[0]].median:.2f}x (medians)")
    return 0


def _name(args: argparse.Namespace) -> str:
    return f"sam {args.sam_type}" if args.sam_type else args.generator


def _spec(args: argparse.Namespace, tmp: Path) -> Any:
    """The GeneratorSpec to bench: a real SAM (from --sam-checkpoint or random weights written to ``tmp``),
    the tiny random SAM, or Felzenszwalb."""
    from dearli.caches.generators import GeneratorSpec

    if args.sam_type:
        checkpoint = args.sam_checkpoint
        if not checkpoint:
            from dearli.bench.gpu import write_random_sam_checkpoint

            checkpoint = str(write_random_sam_checkpoint(args.sam_type, tmp / f"sam_{args.sam_type}.pth", 0))
        # Thresholds 0: random weights keep no mask otherwise, and the mask post-processing belongs in the cost.
        spec = GeneratorSpec(kind="sam", sam_type=args.sam_type, sam_checkpoint=str(Path(checkpoint).resolve()),
                             points_per_side=args.points_per_side, pred_iou_thresh=0.0,
                             stability_score_thresh=0.0)
        spec.validate()
        spec.check_weights()
        return spec
    if args.generator == "sam-tiny":
        return GeneratorSpec(kind="sam", sam_type="tiny", points_per_side=8, points_per_batch=64,
                             pred_iou_thresh=0.0, stability_score_thresh=0.0)
    return GeneratorSpec(kind="felzenszwalb")
