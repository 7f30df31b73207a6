"""``dearli bench ssl``: throughput of the Mean-Teacher stage on the synthetic world.

Two measurements:

* the teacher pool alone: pseudo-labelled weak views per second with 1, 2, ... teacher actors (requests sent
  round-robin, as the student's feed does), actor start-up excluded;
* the whole stage: student images per second (labeled + unlabeled) with 1, 2, ... Train workers, the
  fraction of step time the student waited for pseudo-labels and the staleness distribution, read back
  from the run's metrics.jsonl (the first steps, which include start-up, are left out of the rates).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    parser = bench_subparsers.add_parser(
        "ssl", help="Mean Teacher: student images/s per Train-worker count, teacher pseudo-labels/s per actor count",
        description="Run the Mean-Teacher stage of a preset (default: tiny) on a synthetic world with 1 and 2 Train "
        "workers, and the teacher pool alone with 1 and 2 actors; print images/s, pseudo-labels/s, the "
        "waiting fraction and the staleness distribution. GPUs are used where the cluster has them.",
    )
    parser.add_argument("--workers", default="1,2", help="Train-worker counts (default: 1,2)")
    parser.add_argument("--actors", default="1,2", help="teacher-actor counts (default: 1,2)")
    parser.add_argument("--steps", type=int, default=30, help="student steps per run (default: 30)")
    parser.add_argument("--requests", type=int, default=24, help="teacher requests per actor count (default: 24)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.set_defaults(handler=run_bench_ssl)


def _counts(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def run_bench_ssl(args: argparse.Namespace) -> int:
    from dearli.config import load_config
    from dearli.data.synth.writer import write_synth_dataset
    from dearli.runtime import ensure_ray

    ensure_ray()
    with tempfile.TemporaryDirectory() as tmp:
        world = write_synth_dataset(Path(tmp) / "synth", num_images=64, seed=0, num_val=4)
        # No burn-in: every timed step trains on labeled and unlabeled images.
        base = [f"data.dataset={world}", "data.partition=1_4", "train.log_every=1", "train.eval_every=0",
                f"train.checkpoint_every={10 ** 6}", "ssl.burn_in_steps=0", *args.overrides]
        print("teacher pool (pseudo-labelled views/s):")
        for actors in _counts(args.actors):
            cfg = load_config(args.preset, [*base, f"ssl.teacher_actors={actors}"])
            rate = _teacher_rate(cfg, args.requests)
            print(f"  {actors} actor(s): {rate:.2f} views/s")
        print("student (images/s, labeled + unlabeled; waiting fraction; staleness):")
        for workers in _counts(args.workers):
            cfg = load_config(args.preset, [*base, f"train.num_workers={workers}", f"train.max_steps={args.steps}"])
            print("  " + _student_line(cfg, Path(tmp) / f"run_{workers}", workers))
    return 0


def _teacher_rate(cfg, requests: int) -> float:
    import ray

    from dearli.data.dataset import load_dataset
    from dearli.model.m2f_lang import build_m2f_lang
    from dearli.runtime import cluster_gpus, gpu_share
    from dearli.stages.teacher import start_teacher_pool, stop_teacher_pool
    from dearli.training.ema import trainable_state

    info = load_dataset(cfg.data.dataset)
    stems = [r.stem for r in info.split(cfg.data.train_split).records]
    # the teacher actors alone, each on a GPU (or a share of one) where the cluster has GPUs
    gpus = cfg.ssl.teacher_gpus if cfg.ssl.teacher_gpus >= 0 else gpu_share(cluster_gpus(), cfg.ssl.teacher_actors)
    store, teachers = start_teacher_pool(cfg, 0.25, gpus)
    try:
        model = build_m2f_lang(cfg.model, info.categories.synonyms)
        ray.get(store.publish.remote(0, trainable_state(model)))
        batch = cfg.ssl.unlabeled_batch_size
        warm = [t.label.remote([{"stem": stems[0], "seed": 0}], 0) for t in teachers]
        ray.get(warm)  # start-up (model build, first weights) is not throughput
        started = time.perf_counter()
        refs = [teachers[i % len(teachers)].label.remote(
            [{"stem": stems[(i * batch + j) % len(stems)], "seed": i * batch + j} for j in range(batch)], 0)
            for i in range(requests)]
        ray.get(refs)
        return requests * batch / (time.perf_counter() - started)
    finally:
        stop_teacher_pool(store, teachers)


def _student_line(cfg, run_dir: Path, workers: int) -> str:
    from dearli.stages.ssl import run_ssl

    run_ssl(cfg, run_dir, echo=lambda *_: None, evaluate=False)
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    skip = min(5, len(steps) // 3)  # start-up steps
    timed = steps[skip:]
    seconds = timed[-1]["seconds"] - steps[skip - 1]["seconds"] if skip else timed[-1]["seconds"]
    images = len(timed) * (cfg.ssl.labeled_batch_size + cfg.ssl.unlabeled_batch_size)
    staleness = Counter(int(s["staleness"]) for s in steps)
    wait = statistics.fmean(s["wait_fraction"] for s in timed)
    return (f"{workers} worker(s): {images / seconds:.2f} images/s, waiting {100 * wait:.0f}% of step time, "
            f"staleness {dict(sorted(staleness.items()))} (steps by staleness), max {max(staleness)}")
