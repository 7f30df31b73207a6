"""What a stage's workers cost and where they ran: ``workers.jsonl`` (pid, node, threads of each rank of each
attempt) and ``costs.jsonl`` (peak memory of each worker's loop and of the teacher actors it heard from).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


def record_worker(run_dir: Path, stage: str, rank: int) -> None:
    """Append this worker's pid, Ray node and torch threads to ``workers.jsonl`` (where each rank of each attempt
    ran, and on how many threads)."""
    import ray

    entry = {"stage": stage, "rank": rank, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
             "threads": torch.get_num_threads(), "time": time.time()}
    with open(run_dir / "workers.jsonl", "a") as fh:
        fh.write(json.dumps(entry) + "\n")


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def peak_gpu_mb() -> dict[str, float]:
    """{"gpu_peak_mb": the peak GPU memory this process allocated on its CUDA device, MiB}, or {} off CUDA."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20}


def record_cost(run_dir: Path, stage: str, rank: int, **values: float) -> None:
    """Append what this worker's loop cost (``peak_rss_mb``, ``teacher_peak_rss_mb``, on CUDA ``gpu_peak_mb``
    and ``teacher_gpu_peak_mb``) to ``costs.jsonl``."""
    with open(Path(run_dir) / COSTS_FILE, "a") as fh:
        fh.write(json.dumps({"stage": stage, "rank": rank, "time": time.time(), **values}) + "\n")


COSTS_FILE = "costs.jsonl"  # a stage's per-worker costs, written at the end of each worker's loop


# costs.jsonl's keys -> the stage cost's
PEAK_NAMES = (("peak_rss_mb", "worker_peak_mb"), ("teacher_peak_rss_mb", "teacher_peak_mb"),
              ("gpu_peak_mb", "worker_gpu_peak_mb"), ("teacher_gpu_peak_mb", "teacher_gpu_peak_mb"))


def worker_peaks(run_dir: Path) -> dict[str, float]:
    """The largest peaks a stage's workers recorded in ``costs.jsonl``: {"worker_peak_mb", "teacher_peak_mb"}
    and on CUDA {"worker_gpu_peak_mb", "teacher_gpu_peak_mb"} (a key is absent when no worker recorded it,
    e.g. a stage that was killed)."""
    path, peaks = Path(run_dir) / COSTS_FILE, {}
    if not path.is_file():
        return peaks
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        for key, name in PEAK_NAMES:
            if key in entry:
                peaks[name] = max(peaks.get(name, 0.0), float(entry[key]))
    return peaks
