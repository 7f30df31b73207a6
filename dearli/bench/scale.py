"""``dearli bench scale``: how each batch stage's time and memory grow with the number of images.

For every size (default 1,000 and 10,000 training images of 64×64; 100,000 with ``--sizes``), a synthetic
world is written and every stage runs on it in a fresh process of its own, so each stage's peak memory is
its own: seconds, seconds per thousand images, the process's resident memory before the stage and its peak,
the peak of the largest process it started (a Ray worker or actor, the evaluation's pool), and for stages
that write, the files and bytes they made. The last lines compare the largest size with the smallest: a
stage whose seconds per thousand images grow by more than half is marked "worse".

Stages (see :mod:`dearli.bench.scale_stages`):

* ``world``: ``dearli synth``'s writer;
* ``check``: ``dearli data check --split train`` (every image and annotation decoded);
* ``load``: the dataset and its train split parsed, as every Train worker and teacher actor does;
* ``ssl-split``: the Mean-Teacher stage's split into labeled (the 1/8 partition) and unlabeled images;
* ``teacher-stream``: the student's stream drawing unlabeled views from the whole pool: its first step (which
  orders the pool for the epoch) and 200 more (per step, which must not grow with the pool);
* ``evaluate``: panoptic quality of the train annotations against themselves (every PNG decoded twice);
* ``assemble``: ``dearli pseudo-label``'s final step alone, on committed parts holding every image;
* ``sam-cache``, ``clip-cache``: ``dearli cache sam`` (Felzenszwalb masks) and ``dearli cache clip`` (the tiny
  CLIP), two actors each, on a local Ray started by the stage;
* ``warmup-step``, ``ssl-step``: ``dearli train warmup`` on the SAM cache and ``dearli train ssl`` (teacher
  pool on every unlabeled image), one Train worker, to the end of their first step: Ray Train's start-up
  plus the data start-up;
* ``pseudo-label``, ``suggest``: the two commands with an untrained tiny model on every training image
  (every unlabeled one for ``suggest``); sizes above ``--model-max`` are skipped.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from dearli.bench.scale_stages import MODEL_STAGES, PREPARE, STAGE_FUNCTIONS, DescendantPeak, world_stage

STAGES = tuple(STAGE_FUNCTIONS)
_FIXED_KEYS = ("stage", "images", "seconds", "s_per_1k", "rss_before_mib", "peak_mib", "worker_peak_mib")


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    parser = bench_subparsers.add_parser(
        "scale", help="seconds and memory of each batch stage at 1k, 10k (and 100k) images",
        description="Write synthetic worlds of each size and run every batch stage on each, one process per "
        "stage: seconds, seconds per thousand images, peak memory of the stage's process and of the largest "
        "process it started, files written, and how the figures grow from the smallest size to the largest.",
    )
    parser.add_argument("--sizes", default="1000,10000", help="training images per world (default: 1000,10000)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"which stages (default: all of {STAGES})")
    parser.add_argument("--model-max", type=int, default=10000, metavar="N",
                        help=f"run {', '.join(MODEL_STAGES)} (a model on every image, about 20 ms each on a "
                        "2-core CPU) only on worlds of at most N images (default 10000)")
    parser.add_argument("--workdir", default=None, help="where the worlds go (default: a temporary folder)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    parser.set_defaults(handler=_run)


def _peak_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def run_stage(stage: str, world: str, n: int) -> dict[str, Any]:
    """One stage in this (fresh) process: its figures, with the memory before it and the peak, and the peak of
    the largest process it started and still running at one of the samples (0 without one; not the
    kernel's figure for finished children, which counts a short ``fork``/``exec`` as a copy of this process)."""
    import dearli.cli  # noqa: F401 - the imports every stage pays are not the stage's memory

    before = _peak_mib()
    with DescendantPeak() as workers:
        started = time.perf_counter()
        extra = STAGE_FUNCTIONS[stage](Path(world), n)
        seconds = time.perf_counter() - started
    return {"stage": stage, "images": n, "seconds": seconds, "s_per_1k": 1000 * seconds / n,
            "rss_before_mib": before, "peak_mib": _peak_mib(),
            "worker_peak_mib": workers.peak_mib, **extra}


def _prepare(stage: str, world: str, n: int) -> dict[str, Any]:
    return PREPARE[stage](Path(world), n)


def _in_child(fn: Any, stage: str, world: Path, n: int) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, stage, str(world), n).result()


def growth(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Per stage, the growth of its cost from the smallest world to the largest: "flat" per image (seconds per
    thousand images, or ms per step for the stream, within 1.5x) or "worse" (with the factor)."""
    out = {}
    for stage in dict.fromkeys(r["stage"] for r in rows):
        mine = sorted((r for r in rows if r["stage"] == stage), key=lambda r: r["images"])
        if len(mine) < 2:
            continue
        key = "ms_per_step" if stage == "teacher-stream" else "s_per_1k"
        factor = mine[-1][key] / max(mine[0][key], 1e-9)
        unit = "per step" if key == "ms_per_step" else "per image"
        out[stage] = f"flat {unit} ({factor:.2f}x)" if factor <= 1.5 else f"worse ({factor:.2f}x {unit})"
    return out


def _parse(args: argparse.Namespace) -> tuple[list[int], list[str]]:
    from dearli.errors import ConfigError

    try:
        sizes = sorted(int(v) for v in args.sizes.split(",") if v.strip())
    except ValueError:
        sizes = []
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if not sizes or min(sizes) < 16:
        raise ConfigError(f"--sizes must list image counts of at least 16, got {args.sizes!r:.80}")
    if unknown:
        raise ConfigError(f"--stages: unknown {', '.join(unknown)[:80]} (known: {', '.join(STAGES)})")
    return sizes, [s for s in STAGES if s in stages]  # pipeline order: later stages read earlier ones' outputs


def _run(args: argparse.Namespace) -> int:
    sizes, stages = _parse(args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dearli-bench-scale-") as tmp:
        root = Path(args.workdir or tmp)
        for n in sizes:
            world = root / f"world_{n}"
            if "world" not in stages and not (world / "dataset.yaml").is_file():
                world_stage(world, n)
            for stage in stages:
                if stage in MODEL_STAGES and n > args.model_max:
                    print(f"{stage:>14} {n:>7} images: skipped (--model-max {args.model_max})", flush=True)
                    continue
                if stage in PREPARE:
                    _in_child(_prepare, stage, world, n)
                row = _in_child(run_stage, stage, world, n)
                rows.append(row)
                print(_line(row), flush=True)
    for stage, text in growth(rows).items():
        print(f"growth {stage}: {text}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def _line(row: dict[str, Any]) -> str:
    extra = {k: v for k, v in row.items() if k not in _FIXED_KEYS}
    extra_text = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in extra.items())
    return (f"{row['stage']:>14} {row['images']:>7} images: {row['seconds']:8.2f} s, {row['s_per_1k']:7.3f} s per 1k, "
            f"memory {row['rss_before_mib']:.0f} -> {row['peak_mib']:.0f} MiB "
            f"(largest child {row['worker_peak_mib']:.0f}); "
            f"{extra_text}")
