"""``dearli bench ssl``: throughput of the Mean-Teacher stage on the synthetic world.

Two measurements:

* the teacher pool alone: pseudo-labelled weak views per second with 1, 2, ... teacher actors (requests sent
  round-robin, as the student's feed does): every actor labels two full batches untimed first (start-up, first
  weights, first allocations) and one whole round untimed, then ``--repeats`` rounds of ``--requests`` are timed;
* the whole stage: student images per second (labeled + unlabeled) with 1, 2, ... Train workers, the
  fraction of step time the student waited for pseudo-labels and the staleness distribution, read back
  from the run's metrics.jsonl (the first steps, which include start-up, are left out; the rest is cut into
  windows of five steps, one rate each).

Every rate is printed as its median with the minimum and maximum of its repeats (:mod:`dearli.bench.spread`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from dearli.bench.spread import Spread, repeated

WINDOW = 5  # student steps per timed window


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
    parser.add_argument("--requests", type=int, default=24, help="teacher requests per timed round (default: 24)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per actor count (default: 5)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.set_defaults(handler=run_bench_ssl)


def _counts(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def run_bench_ssl(args: argparse.Namespace) -> int:
    from dearli.data.synth.writer import write_synth_dataset
    from dearli.pretrain.resolve import load_resolved_config
    from dearli.runtime import ensure_ray

    ensure_ray()
    with tempfile.TemporaryDirectory() as tmp:
        world = write_synth_dataset(Path(tmp) / "synth", num_images=64, seed=0, num_val=4)
        # No burn-in: every timed step trains on labeled and unlabeled images.
        base = [f"data.dataset={world}", "data.partition=1_4", "train.log_every=1", "train.eval_every=0",
                f"train.checkpoint_every={10 ** 6}", "ssl.burn_in_steps=0", *args.overrides]
        print("teacher pool (pseudo-labelled views/s):")
        rates = {}
        for actors in _counts(args.actors):
            cfg = load_resolved_config(args.preset, [*base, f"ssl.teacher_actors={actors}"])
            rates[actors] = _teacher_rate(cfg, args.requests, args.repeats)
            print(f"  {actors} actor(s): {rates[actors].text()} views/s")
        first = next(iter(rates.values()), None)
        for actors, rate in list(rates.items())[1:]:
            print(f"  speed-up {actors} vs {next(iter(rates))} actor(s): {rate.median / first.median:.2f}x (medians)")
        print("student (images/s, labeled + unlabeled; waiting fraction; staleness):")
        for workers in _counts(args.workers):
            cfg = load_resolved_config(args.preset, [*base, f"train.num_workers={workers}",
                                                     f"train.max_steps={args.steps}"])
            print("  " + _student_line(cfg, Path(tmp) / f"run_{workers}", workers))
    return 0


def _teacher_rate(cfg, requests: int, repeats: int) -> Spread:
    import ray

    from dearli.data.dataset import load_dataset
    from dearli.model.m2f_lang import build_m2f_lang
    from dearli.runtime import cluster_gpus, gpu_share
    from dearli.stages.teacher import start_teacher_pool, stop_teacher_pool
    from dearli.training.ema import trainable_state

    info = load_dataset(cfg.data.dataset)
    stems = info.split(cfg.data.train_split).stems
    # the teacher actors alone, each on a GPU (or a share of one) where the cluster has GPUs
    gpus = cfg.ssl.teacher_gpus if cfg.ssl.teacher_gpus >= 0 else gpu_share(cluster_gpus(), cfg.ssl.teacher_actors)
    store, teachers = start_teacher_pool(cfg, 0.25, gpus)
    try:
        model = build_m2f_lang(cfg.model, info.categories.synonyms)
        ray.get(store.publish.remote(0, trainable_state(model)))
        batch = cfg.ssl.unlabeled_batch_size

        def views(i: int) -> list[dict]:
            return [{"stem": stems[(i * batch + j) % len(stems)], "seed": i * batch + j} for j in range(batch)]

        # start-up (model build, first weights, first full batch) is not throughput
        ray.get([t.label.remote(views(k), 0) for k in range(2) for t in teachers])

        def rate() -> float:
            started = time.perf_counter()
            ray.get([teachers[i % len(teachers)].label.remote(views(i), 0) for i in range(requests)])
            return requests * batch / (time.perf_counter() - started)

        return repeated(rate, repeats, warmup=1)  # a whole round untimed: every actor has read every image once
    finally:
        stop_teacher_pool(store, teachers)


def _student_line(cfg, run_dir: Path, workers: int) -> str:
    from dearli.stages.mean_teacher import run_mean_teacher

    run_mean_teacher(cfg, run_dir, echo=lambda *_: None, evaluate=False)
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    skip = max(1, min(5, len(steps) // 3))  # start-up steps
    per_step = cfg.ssl.labeled_batch_size + cfg.ssl.unlabeled_batch_size
    # one rate per window of five steps after start-up: seconds is the time since the stage began
    edges = list(range(skip - 1, len(steps), WINDOW))
    rates = [WINDOW * per_step / (steps[b]["seconds"] - steps[a]["seconds"]) for a, b in zip(edges, edges[1:])]
    staleness = Counter(int(s["staleness"]) for s in steps)
    wait = statistics.fmean(s["wait_fraction"] for s in steps[skip:])
    rate = Spread.of(rates).text() if rates else "too few steps for a window"
    return (f"{workers} worker(s): {rate} images/s, waiting {100 * wait:.0f}% of step time, "
            f"staleness {dict(sorted(staleness.items()))} (steps by staleness), max {max(staleness)}")
