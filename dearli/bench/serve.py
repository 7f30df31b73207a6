"""``dearli bench serve``: requests/s and latency of the labeling endpoint for 1, 2, ... replicas.

Each configuration is deployed on loopback, warmed (one request per replica, so models are loaded), then sent
``--requests`` real HTTP requests from ``--concurrency`` client threads, cycling over the images of a split.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    parser = bench_subparsers.add_parser(
        "serve", help="requests/s and p50/p95 latency of 'dearli serve' for 1 and 2 replicas",
        description="Deploy the labeling endpoint on 127.0.0.1 with each replica count in turn and time real HTTP "
        "requests (image files of a dataset split). Without --checkpoint: a random tiny model on a small "
        "synthetic world (the cost of the serving path, not of a trained model).",
    )
    parser.add_argument("--checkpoint", default=None, help="checkpoint file or models:/NAME/N (default: random tiny)")
    parser.add_argument("--dataset", default=None, help="images to send: this dataset's --split (default: the "
                        "checkpoint's dataset)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--replicas", default="1,2", help="replica counts to compare (default: 1,2)")
    parser.add_argument("--requests", type=int, default=60, help="timed requests per configuration (default: 60)")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads (default: 4)")
    parser.add_argument("--gpus-per-replica", type=float, default=-1.0)
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    parser.set_defaults(handler=_run)


def _random_checkpoint(workdir: Path) -> tuple[str, str]:
    """A random tiny model on a 128 px synthetic world (10 val images): (checkpoint, dataset)."""
    import torch

    from dearli.config import load_config
    from dearli.data.dataset import load_dataset
    from dearli.data.synth.writer import write_synth_dataset
    from dearli.model.m2f_lang import build_m2f_lang
    from dearli.training.checkpoint import save_checkpoint

    dataset = write_synth_dataset(workdir / "synth", num_images=4, seed=0, num_val=10)
    cfg = load_config("tiny", [f"data.dataset={dataset}"])
    torch.manual_seed(0)
    model = build_m2f_lang(cfg.model, load_dataset(dataset).categories.synonyms)
    return str(save_checkpoint(workdir / "run", 0, model, cfg)), str(dataset)


def _post(url: str, body: bytes) -> float:
    """Seconds one request took; raises on a non-200 answer."""
    start = time.perf_counter()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=300) as response:
        response.read()
    return time.perf_counter() - start


def _time_requests(url: str, images: list[bytes], count: int, concurrency: int) -> dict[str, float]:
    bodies = [images[i % len(images)] for i in range(count)]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        latencies = np.array(list(pool.map(lambda body: _post(url, body), bodies)))
    wall = time.perf_counter() - start
    return {"requests": count, "requests_per_s": count / wall, "p50_ms": 1000 * float(np.percentile(latencies, 50)),
            "p95_ms": 1000 * float(np.percentile(latencies, 95))}


def _run(args: argparse.Namespace) -> int:
    from ray import serve

    from dearli.data.dataset import load_dataset
    from dearli.errors import ConfigError
    from dearli.predict.serve import APP_NAME, ServeOptions, build_app, start
    from dearli.runtime import ensure_ray

    counts = [int(c) for c in args.replicas.split(",") if c.strip()]
    if not counts or min(counts) < 1 or args.requests < 1 or args.concurrency < 1:
        raise ConfigError("--replicas must list positive counts; --requests and --concurrency must be positive")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, dataset = args.checkpoint, args.dataset
        if checkpoint is None:
            checkpoint, default_dataset = _random_checkpoint(Path(tmp))
            dataset = dataset or default_dataset
        if dataset is None:
            raise ConfigError("--dataset: needed with --checkpoint (the images to send)")
        split = load_dataset(dataset).split(args.split)
        images = [record.image_path.read_bytes() for record in split.records[:50]]
        ensure_ray()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        results = []
        for count in counts:
            options = ServeOptions(replicas=count, gpus_per_replica=args.gpus_per_replica)
            url = start(build_app(checkpoint, None, options), "127.0.0.1", port)
            _time_requests(url, images, 2 * count, count)  # warm every replica
            figures = {"replicas": count, "concurrency": args.concurrency,
                       **_time_requests(url, images, args.requests, args.concurrency)}
            results.append(figures)
            print(f"replicas {count}: {figures['requests_per_s']:.1f} requests/s, p50 {figures['p50_ms']:.0f} ms, "
                  f"p95 {figures['p95_ms']:.0f} ms ({args.requests} requests, {args.concurrency} clients)", flush=True)
            serve.delete(APP_NAME)
        serve.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0
