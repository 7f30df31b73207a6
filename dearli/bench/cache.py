"""``dearli bench cache``: SAM-cache throughput on Ray with 1, 2, ... actors (CPU).

Synthetic images (smooth colour blobs) are written to a temporary directory and cached once per actor
count into a fresh cache; throughput is images / wall-clock seconds of the whole job, so it includes
each run's fixed cost of starting the actors and loading the generator (use more images to dilute it).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

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
                        help="felzenszwalb (classical) or sam-tiny (tiny random SAM, the real SAM code path)")
    parser.add_argument("--actors", default="1,2", help="comma-separated actor counts (default: 1,2)")
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

    from dearli.caches.generators import GeneratorSpec
    from dearli.caches.job import run_cache_job
    from dearli.caches.workers import SamWorker
    from dearli.errors import ConfigError
    from dearli.runtime import ray_session

    try:
        counts = [int(v) for v in args.actors.split(",") if v.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1 or args.num_images < 1:
        raise ConfigError("--actors must list positive integers (e.g. 1,2) and --num-images must be positive")
    if args.generator == "sam-tiny":
        spec = GeneratorSpec(kind="sam", sam_type="tiny", points_per_side=8, points_per_batch=64,
                             pred_iou_thresh=0.0, stability_score_thresh=0.0)
    else:
        spec = GeneratorSpec(kind="felzenszwalb")
    rates = []
    with ray_session(), tempfile.TemporaryDirectory(prefix="dearli-bench-cache-") as tmp:
        rows = _write_images(Path(tmp), args.num_images, args.size)
        for n in counts:
            # Several parts per actor so the pool can balance the load.
            per_part = max(1, args.num_images // (4 * n))
            start = time.perf_counter()
            summary = run_cache_job(str(Path(tmp) / f"cache-{n}"), "sam", spec.settings(), rows, SamWorker,
                                    {"spec": dataclasses.asdict(spec)}, actors=n, gpus_per_actor=0,
                                    images_per_part=per_part)
            seconds = time.perf_counter() - start
            rates.append(summary.done / seconds)
            print(f"{args.generator}, {n} actor(s): {summary.done} images of {args.size}² in {seconds:.1f} s "
                  f"-> {rates[-1]:.2f} images/s")
    for n, rate in zip(counts[1:], rates[1:]):
        print(f"speed-up {n} vs {counts[0]} actor(s): {rate / rates[0]:.2f}x")
    return 0
