"""``dearli bench scale``: how each batch stage's time and memory grow with the number of images.

For every size (default 1,000 and 10,000 training images of 64×64; 100,000 with ``--sizes``), a synthetic
world is written and every stage runs on it in a fresh process of its own, so each stage's peak memory is
its own: seconds, seconds per thousand images, the process's resident memory before the stage and its peak
(and the peak of the largest worker process it started), and for stages that write, the files and bytes
they made. The last lines compare the largest size with the smallest: a stage whose seconds per thousand
images grow by more than half is marked "worse".

Stages (driver side; the Ray stages have benches of their own):

* ``world``: ``dearli synth``'s writer;
* ``check``: ``dearli data check --split train`` (every image and annotation decoded);
* ``load``: the dataset and its train split parsed, as every Train worker and teacher actor does;
* ``ssl-start``: the Mean-Teacher stage's split into labeled (the 1/8 partition) and unlabeled images;
* ``teacher-stream``: the student's stream drawing unlabeled views from the whole pool: its first step (which
  orders the pool for the epoch) and 200 more (per step, which must not grow with the pool);
* ``evaluate``: panoptic quality of the train annotations against themselves (every PNG decoded twice).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

STAGES = ("world", "check", "load", "ssl-start", "teacher-stream", "evaluate")
STREAM_STEPS = 200
IMAGE_SIZE = (64, 64)


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    parser = bench_subparsers.add_parser(
        "scale", help="seconds and memory of each batch stage at 1k, 10k (and 100k) images",
        description="Write synthetic worlds of each size and run every driver-side batch stage on each, one "
        "process per stage: seconds, seconds per thousand images, peak memory, files written, and how the "
        "figures grow from the smallest size to the largest.",
    )
    parser.add_argument("--sizes", default="1000,10000", help="training images per world (default: 1000,10000)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"which stages (default: all of {STAGES})")
    parser.add_argument("--workdir", default=None, help="where the worlds go (default: a temporary folder)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    parser.set_defaults(handler=_run)


def _peak_mib(who: int = resource.RUSAGE_SELF) -> float:
    peak = resource.getrusage(who).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _files(folder: Path) -> tuple[int, int]:
    paths = [p for p in folder.rglob("*") if p.is_file()]
    return len(paths), sum(p.stat().st_size for p in paths)


def _world(world: Path, n: int) -> dict[str, Any]:
    from dearli.data.synth.writer import write_synth_dataset

    write_synth_dataset(world, num_images=n, seed=0, num_val=10, image_size=IMAGE_SIZE)
    files, size = _files(world)
    return {"files": files, "bytes": size}


def _check(world: Path, n: int) -> dict[str, Any]:
    import contextlib
    import io

    from dearli.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(["data", "check", str(world), "--split", "train", "--no-progress"])
    return {"exit": code}


def _load(world: Path, n: int) -> dict[str, Any]:
    from dearli.data.dataset import load_dataset

    return {"records": len(load_dataset(world).split("train").records)}


def _labeled_and_unlabeled(world: Path) -> tuple[list[str], list[str]]:
    from dearli.config import load_config
    from dearli.data.dataset import load_dataset
    from dearli.training.supervised import labeled_stems

    cfg = load_config("tiny", [f"data.dataset={world}", "data.partition=1_8"])
    info = load_dataset(world)
    labeled = labeled_stems(info, cfg)
    labeled_set = set(labeled)
    return labeled, [r.stem for r in info.split(cfg.data.train_split).records if r.stem not in labeled_set]


def _ssl_start(world: Path, n: int) -> dict[str, Any]:
    labeled, unlabeled = _labeled_and_unlabeled(world)
    return {"labeled": len(labeled), "unlabeled": len(unlabeled)}


def _teacher_stream(world: Path, n: int) -> dict[str, Any]:
    from dearli.stages.teacher import PseudoLabelFeed

    _, unlabeled = _labeled_and_unlabeled(world)
    feed = PseudoLabelFeed([], unlabeled, per_step=8, rank=0, world=1, seed=0, prefetch=0, max_staleness=1)
    started = time.perf_counter()
    feed._requests()  # the first step of an epoch also orders the pool: once per epoch, not per step
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(STREAM_STEPS):
        feed._requests()
    return {"first_step_ms": 1000 * first, "ms_per_step": 1000 * (time.perf_counter() - started) / STREAM_STEPS}


def _evaluate(world: Path, n: int) -> dict[str, Any]:
    from dearli.evaluation.pq import pq_compute

    json_file, folder = world / "annotations" / "panoptic_train.json", world / "annotations" / "panoptic_train"
    result = pq_compute(json_file, folder, json_file, folder, progress=False)
    return {"pq": round(100 * result["All"]["pq"], 2)}


STAGE_FUNCTIONS: dict[str, Callable[[Path, int], dict[str, Any]]] = {
    "world": _world, "check": _check, "load": _load, "ssl-start": _ssl_start, "teacher-stream": _teacher_stream,
    "evaluate": _evaluate}


def run_stage(stage: str, world: str, n: int) -> dict[str, Any]:
    """One stage in this (fresh) process: its figures, with the memory before it and the peak, and the peak of
    the largest worker process it started (evaluation's pool), 0 without one."""
    import dearli.cli  # noqa: F401 - the imports every stage pays are not the stage's memory

    before = _peak_mib()
    started = time.perf_counter()
    extra = STAGE_FUNCTIONS[stage](Path(world), n)
    seconds = time.perf_counter() - started
    return {"stage": stage, "images": n, "seconds": seconds, "s_per_1k": 1000 * seconds / n,
            "rss_before_mib": before, "peak_mib": _peak_mib(),
            "worker_peak_mib": _peak_mib(resource.RUSAGE_CHILDREN), **extra}


def _in_child(stage: str, world: Path, n: int) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(run_stage, stage, str(world), n).result()


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


def _run(args: argparse.Namespace) -> int:
    from dearli.errors import ConfigError

    try:
        sizes = sorted(int(v) for v in args.sizes.split(",") if v.strip())
    except ValueError:
        sizes = []
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if not sizes or min(sizes) < 16 or unknown:
        raise ConfigError(f"--sizes must list counts of at least 16; unknown --stages {unknown} (known: {STAGES})")
    rows = []
    with tempfile.TemporaryDirectory(prefix="dearli-bench-scale-") as tmp:
        root = Path(args.workdir or tmp)
        for n in sizes:
            world = root / f"world_{n}"
            if "world" not in stages and not (world / "dataset.yaml").is_file():
                _world(world, n)
            for stage in stages:
                row = _in_child(stage, world, n)
                rows.append(row)
                print(_line(row), flush=True)
    for stage, text in growth(rows).items():
        print(f"growth {stage}: {text}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def _line(row: dict[str, Any]) -> str:
    extra = {k: v for k, v in row.items() if k not in ("stage", "images", "seconds", "s_per_1k", "rss_before_mib",
                                                        "peak_mib", "worker_peak_mib")}
    extra_text = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in extra.items())
    return (f"{row['stage']:>14} {row['images']:>7} images: {row['seconds']:8.2f} s, {row['s_per_1k']:7.3f} s per 1k, "
            f"memory {row['rss_before_mib']:.0f} -> {row['peak_mib']:.0f} MiB (workers {row['worker_peak_mib']:.0f}); "
            f"{extra_text}")
