"""``dearli bench serve``: requests/s and latency of the labeling endpoint for 1, 2, ... replicas; with
``--hostile``, good requests mixed with every hostile kind of :mod:`dearli.bench.hostile`.

Each configuration is deployed on loopback, warmed (one request per replica, so models are loaded), then sent
``--requests`` real HTTP requests from ``--concurrency`` client threads, cycling over the images of a split.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from dearli.bench.spread import Spread


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
    parser.add_argument("--concurrency", type=int, default=0,
                        help="client threads (default: 4; with --hostile 64, above what one replica holds and queues)")
    parser.add_argument("--hostile", action="store_true",
                        help="one replica with a token and the default bounds: --requests good requests mixed with "
                        "--rounds of every hostile kind; prints statuses, 429s, p50/p95 of the good ones, the "
                        "replica's peak memory and whether it answers afterwards")
    parser.add_argument("--rounds", type=int, default=3, help="--hostile: each hostile kind sent this often")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per replica count, after the warm-up "
                        "(default: 3)")
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


def _post(url: str, body: bytes, token: str = "") -> float:
    """Seconds one request took; raises on a non-200 answer."""
    start = time.perf_counter()
    headers = {"Content-Type": "application/octet-stream", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=body, headers=headers)
    with urllib.request.urlopen(request, timeout=300) as response:
        response.read()
    return time.perf_counter() - start


def _time_requests(url: str, images: list[bytes], count: int, concurrency: int, token: str = "") -> dict[str, float]:
    bodies = [images[i % len(images)] for i in range(count)]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        latencies = np.array(list(pool.map(lambda body: _post(url, body, token), bodies)))
    wall = time.perf_counter() - start
    return {"requests": count, "requests_per_s": count / wall, "p50_ms": 1000 * float(np.percentile(latencies, 50)),
            "p95_ms": 1000 * float(np.percentile(latencies, 95))}


def _run(args: argparse.Namespace) -> int:
    from ray import serve

    from dearli.data.dataset import load_dataset
    from dearli.errors import ConfigError
    from dearli.predict.serve import APP_NAME, build_app, start
    from dearli.predict.serve_options import ServeOptions
    from dearli.runtime import ensure_ray

    counts = [1] if args.hostile else [int(c) for c in args.replicas.split(",") if c.strip()]
    concurrency = args.concurrency or (64 if args.hostile else 4)
    if not counts or min(counts) < 1 or min(args.requests, concurrency, args.rounds, args.repeats) < 1:
        raise ConfigError("--replicas must list positive counts; --requests, --concurrency, --rounds and --repeats "
                          "must be positive")
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
            token = "bench-token" if args.hostile else ""
            options = ServeOptions(replicas=count, gpus_per_replica=args.gpus_per_replica, token=token)
            url = start(build_app(checkpoint, None, options), "127.0.0.1", port, options.request_timeout_s)
            _time_requests(url, images, 2 * count, count, token)  # warm every replica
            if args.hostile:
                results.append(_hostile(url, checkpoint, images, args, concurrency, token))
            else:
                rounds = [_time_requests(url, images, args.requests, concurrency) for _ in range(args.repeats)]
                figures = {"replicas": count, "concurrency": concurrency,
                           **{key: Spread.of([r[key] for r in rounds]).as_dict()
                              for key in ("requests_per_s", "p50_ms", "p95_ms")}}
                results.append(figures)
                print(f"replicas {count}: {Spread.of([r['requests_per_s'] for r in rounds]).text(1)} requests/s, "
                      f"p50 {figures['p50_ms']['median']:.0f} ms, p95 {figures['p95_ms']['median']:.0f} ms (medians "
                      f"of {args.repeats} rounds of {args.requests} requests, {concurrency} clients)", flush=True)
            serve.delete(APP_NAME)
        serve.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def expected_answers(checkpoint: str, images: list[bytes]) -> list[tuple[np.ndarray, list[tuple[int, int]]]]:
    """What ``dearli predict`` labels each image as, in this process: (segment-id map, sorted (id, class id))."""
    from dearli.model.predictor import predict_image
    from dearli.predict.labeler import decode_image
    from dearli.predict.model_source import checkpoint_file, resolve_classes
    from dearli.predict.outputs import segment_records
    from dearli.predict.worker import load_predictor
    from dearli.training.checkpoint import load_checkpoint

    payload = load_checkpoint(checkpoint_file(checkpoint), "cpu")
    categories = resolve_classes(None, payload["config"])
    model, cfg = load_predictor(payload, categories)
    expected = []
    for data in images:
        pred = predict_image(model, decode_image(data, 1 << 40), cfg.model, categories.thing_ids)
        records = segment_records(pred.panoptic, pred.segments, categories)
        expected.append((pred.panoptic, sorted((r["id"], r["category_id"]) for r in records)))
    return expected


def answer_matches(answer: dict, expected: tuple[np.ndarray, list[tuple[int, int]]]) -> bool:
    from dearli.data.coco_format import rgb2id

    png = Image.open(io.BytesIO(base64.b64decode(answer["png"]))).convert("RGB")
    ids = rgb2id(np.asarray(png))
    pairs = sorted((s["id"], s["category_id"]) for s in answer["segments_info"])
    return ids.shape == expected[0].shape and bool((ids == expected[0]).all()) and pairs == expected[1]


def replica_memory_mib() -> dict[str, float]:
    """Resident and peak resident (VmHWM) memory of this machine's labeler replica processes, in MiB."""
    import psutil

    figures = {"rss_mib": 0.0, "peak_mib": 0.0}
    for process in psutil.process_iter(["cmdline", "pid"]):
        if "ServeReplica:dearli:labeler" not in " ".join(process.info["cmdline"] or []):
            continue
        try:
            status = Path(f"/proc/{process.info['pid']}/status").read_text()
        except OSError:
            continue
        values = {line.split(":")[0]: float(line.split()[1]) / 1024 for line in status.splitlines()
                  if line.startswith(("VmRSS", "VmHWM"))}
        figures["rss_mib"] += values.get("VmRSS", 0.0)
        figures["peak_mib"] = max(figures["peak_mib"], values.get("VmHWM", 0.0))
    return figures


def _hostile(url: str, checkpoint: str, images: list[bytes], args: argparse.Namespace, concurrency: int,
             token: str) -> dict:
    from dearli.bench.hostile import good_probes, hostile_probes, run_mixed, send, summarize

    expected = expected_answers(checkpoint, images)
    probes = good_probes(images, args.requests, token) + hostile_probes(images[0], token) * args.rounds
    before = replica_memory_mib()
    outcomes = run_mixed(url, probes, concurrency)
    after = replica_memory_mib()
    figures = summarize(outcomes, probes, lambda o: answer_matches(o.answer, expected[o.image]))
    figures["alone"] = {}
    for probe in hostile_probes(images[0], token):  # each kind once more, without load: its own answer
        outcome = send(url, probe)
        figures["alone"][probe.kind] = {"status": outcome.status, "reason": outcome.reason,
                                        "seconds": outcome.seconds, "as_expected": outcome.status in probe.expect}
    last = send(url, good_probes(images, 1, token)[0])
    figures.update(replicas=1, concurrency=concurrency, rss_before_mib=before["rss_mib"],
                   peak_mib=after["peak_mib"], up_after=last.status == 200 and answer_matches(last.answer, expected[0]))
    print(f"hostile: {figures['sent']} requests from {concurrency} clients, {figures['good_sent']} good: "
          f"{figures['good_correct']} answered correctly, {figures['good_wrong']} wrong, {figures['good_429']} "
          f"refused with 429, other {figures['good_other'] or 'none'}; 5xx answers: {figures['status_5xx']}; "
          f"longest reason {figures['longest_reason']} characters", flush=True)
    print(f"  good answers: p50 {figures['good_p50_ms']:.0f} ms, p95 {figures['good_p95_ms']:.0f} ms", flush=True)
    for kind, entry in figures["hostile"].items():
        statuses = ", ".join(f"{code} x{n}" for code, n in sorted(entry["statuses"].items()))
        print(f"  {kind}: {statuses} ({'as expected' if entry['as_expected'] else 'NOT AS EXPECTED'})", flush=True)
    print("each hostile kind alone, after the load:", flush=True)
    for kind, entry in figures["alone"].items():
        print(f"  {kind}: {entry['status']} in {entry['seconds']:.2f} s "
              f"({'as expected' if entry['as_expected'] else 'NOT AS EXPECTED'}) {entry['reason'][:90]!r}", flush=True)
    print(f"replica memory: {before['rss_mib']:.0f} MiB resident before, peak {after['peak_mib']:.0f} MiB; "
          f"answers a good request afterwards: {'yes' if figures['up_after'] else 'NO'}", flush=True)
    return figures
