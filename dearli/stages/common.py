"""What the Ray Train stages share: Ray connection, scaling/run configs, checkpoints, progress lines.

A stage is a ``TorchTrainer`` whose training function runs on ``train.num_workers`` workers (DDP; GPUs
when the cluster has them). Rank 0 writes the run directory (config, metrics.jsonl, checkpoints under
``checkpoints/``, evaluations), and reports every checkpoint to Ray Train so that a replaced worker
group, or a rerun with ``--resume`` (same run name and storage), continues from it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dearli.config import Config
from dearli.config_io import from_dict, to_dict
from dearli.errors import DataError, DearliError
from dearli.runtime import cluster_has_gpus, gpu_share, quiet
from dearli.training.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint

CHECKPOINT_FILE = "state.pt"  # the dearli checkpoint inside a Ray Train checkpoint directory


def train_uses_gpu(cfg: Config, cluster_has_gpu: bool) -> bool:
    """Train workers on GPUs: when asked, or (auto) when the cluster has GPUs and ``train.device`` allows."""
    # train.device=cpu keeps the workers off the GPUs even where the cluster has them.
    return cfg.train.use_gpu == "yes" or (cfg.train.use_gpu == "auto" and cluster_has_gpu
                                          and cfg.train.device != "cpu")


def scaling_config(cfg: Config, gpu_per_worker: float = 1.0):
    """``train.num_workers`` workers, each with ``gpu_per_worker`` GPUs where :func:`train_uses_gpu`."""
    from ray.train import ScalingConfig

    use_gpu = train_uses_gpu(cfg, cluster_has_gpus())
    resources = {"CPU": cfg.train.cpus_per_worker, **cfg.train.worker_resources}
    if use_gpu:
        resources["GPU"] = gpu_per_worker
    return ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu, resources_per_worker=resources,
                         placement_strategy=cfg.train.placement_strategy)


def ssl_gpus(cfg: Config, cluster_gpus: float) -> tuple[float, float]:
    """GPUs per Train worker and per teacher actor of the Mean-Teacher stage on a cluster with ``cluster_gpus``.

    Both want a GPU; where they outnumber the GPUs they share them (``runtime.gpu_share``): one GPU, one
    worker and one teacher (the paper's single-GPU setting) gives 0.5 each, where 1 each would leave the teacher
    unplaced and the student waiting for its labels forever. ``ssl.teacher_gpus`` >= 0 is taken as given.
    """
    workers = cfg.train.num_workers if train_uses_gpu(cfg, cluster_gpus > 0) else 0
    auto_teachers = cfg.ssl.teacher_actors if cfg.ssl.teacher_gpus < 0 else 0
    share = gpu_share(cluster_gpus, workers + auto_teachers)
    worker = (share or 1.0) if workers else 0.0  # train.use_gpu=yes on a cluster without GPUs: Ray says so
    return worker, cfg.ssl.teacher_gpus if cfg.ssl.teacher_gpus >= 0 else share


def train_run_name(run_dir: str | Path, stage: str) -> str:
    """The Ray Train run name of ``stage`` in ``run_dir``: ``<dir name>-<stage>-<8 hex>``.

    Stages of different run directories may share one ``train.storage_path`` (two folders named ``out``,
    say): the hash of the absolute run directory keeps their Train runs apart, and is the same again when
    the same directory is resumed, so ``--resume`` finds its Ray Train checkpoints.
    """
    resolved = Path(run_dir).expanduser().resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:8]
    return f"{resolved.name}-{stage}-{digest}"


def run_config(cfg: Config, run_dir: Path, stage: str):
    """One named Ray Train run per stage (:func:`train_run_name`); storage on ``train.storage_path``
    (default: inside the run dir)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig

    storage = cfg.train.storage_path or str(run_dir / "ray")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    return RunConfig(
        name=train_run_name(run_dir, stage), storage_path=storage,
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        logging_config=LoggingConfig(log_level="WARNING"),
    )


def absolute(path: str | None) -> str | None:
    """A local path made absolute (URIs and "" unchanged): Train workers and actors on other nodes run in
    other working directories, where a relative path names nothing, or something else."""
    if not path or "://" in str(path):
        return path
    return str(Path(path).expanduser().resolve())


def with_absolute_paths(cfg: Config) -> Config:
    """``cfg`` with the local paths its workers open (dataset, a CLIP weights file) made absolute, after
    checking here that a CLIP weights file holds the configured model (a clear error before any worker starts)."""
    import dataclasses

    from dearli.model.backbone import check_clip_weights

    backbone = cfg.model.backbone
    check_clip_weights(backbone.clip_model, str(Path(backbone.pretrained).expanduser()) if backbone.pretrained else "")
    if backbone.pretrained and Path(backbone.pretrained).expanduser().is_file():
        backbone = dataclasses.replace(backbone, pretrained=absolute(backbone.pretrained))
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset=absolute(cfg.data.dataset)),
                               model=dataclasses.replace(cfg.model, backbone=backbone))


def prepare_stage_dir(run_dir: str | Path, cfg: Config, resume: bool) -> Path:
    """Create the stage's run directory with its config; a used directory needs ``resume``."""
    from dearli.config import save_config

    run_dir = Path(run_dir).expanduser().resolve()
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        raise DataError(run_dir, "run directory is not empty; pass --resume to continue it or choose a new --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    return run_dir


def loop_config(cfg: Config, run_dir: Path, **extra: Any) -> dict[str, Any]:
    """The picklable ``train_loop_config``: the resolved config as a dict, the run dir, anything else."""
    return {"cfg": to_dict(cfg), "run_dir": str(run_dir), **extra}


def config_from_loop(config: dict[str, Any]) -> Config:
    """The worker's config (and its logging as quiet as the driver's)."""
    quiet(config.get("verbose", False))
    return from_dict(Config, config["cfg"])


def worker_device(cfg: Config) -> torch.device:
    """The device of a Train worker: ``train.device`` when set, else (auto) the one Ray Train assigned."""
    from ray.train.torch import get_device

    from dearli.device import resolve_device

    return get_device() if cfg.train.device == "auto" else resolve_device(cfg.train.device)


def set_worker_threads(cfg: Config) -> None:
    """``train.threads_per_worker`` torch threads in this worker (0 leaves Ray's choice)."""
    if cfg.train.threads_per_worker:
        torch.set_num_threads(cfg.train.threads_per_worker)


def report_checkpoint(rank: int, run_dir: Path, step: int, metrics: dict[str, Any], write) -> None:
    """Every rank calls this (it is a barrier); rank 0 writes the checkpoint with ``write(folder)``.

    The same file is kept in the run's ``checkpoints/`` (what ``dearli predict`` and the next stage read)
    and handed to Ray Train, which restores it after a worker failure or on ``--resume``.
    """
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp))
        os.replace(path, Path(tmp) / CHECKPOINT_FILE)
        kept = checkpoint_path(run_dir, step)
        if not kept.exists():  # a step repeated after a failure is already kept
            kept.parent.mkdir(parents=True, exist_ok=True)
            tmp_kept = kept.with_name(kept.name + f".tmp{os.getpid()}")
            tmp_kept.write_bytes((Path(tmp) / CHECKPOINT_FILE).read_bytes())
            os.replace(tmp_kept, kept)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def write_stage_checkpoint(folder: Path, step: int, model: torch.nn.Module, cfg: Config, optimizer, scheduler,
                           extra: dict[str, Any]) -> Path:
    """A dearli checkpoint file in ``folder``; returns its path."""
    return save_checkpoint(folder, step, model, cfg, optimizer, scheduler, extra=extra)


def latest_stage_checkpoint(device: torch.device, run_dir: Path) -> dict[str, Any] | None:
    """The payload to resume from after a worker failure or on ``--resume``, if any.

    Rank 0 writes each checkpoint into the run's ``checkpoints/`` before reporting it to Ray Train, and the
    controller registers a report only when it next polls the workers: a worker killed in between leaves
    the newest checkpoint in the run directory alone. So the newer of the two is used.
    """
    import ray.train

    from dearli.training.checkpoint import latest_checkpoint

    candidates = []
    if (own := latest_checkpoint(run_dir)) is not None:
        candidates.append(load_checkpoint(own, device))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            candidates.append(load_checkpoint(Path(folder) / CHECKPOINT_FILE, device))
    payload = max(candidates, key=lambda payload: payload["step"]) if candidates else None
    if payload is not None and ray.train.get_context().get_world_rank() == 0:
        # FollowMetrics turns it into the driver's "resumed from checkpoint step N" line.
        with open(run_dir / "metrics.jsonl", "a") as fh:
            fh.write(f'{{"step": {int(payload["step"])}, "resumed": true}}\n')
    return payload


def record_worker(run_dir: Path, stage: str, rank: int) -> None:
    """Append this worker's pid, Ray node and torch threads to ``workers.jsonl`` (where each rank of each attempt
    ran, and on how many threads)."""
    import json

    import ray

    entry = {"stage": stage, "rank": rank, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
             "threads": torch.get_num_threads(), "time": time.time()}
    with open(run_dir / "workers.jsonl", "a") as fh:
        fh.write(json.dumps(entry) + "\n")


def per_rank(total: int, world: int) -> int:
    """Images per worker per step: a configured batch split across ``world`` workers, rounded up (a step never
    sees fewer images than configured; at least one each). The one rule of every Ray Train stage."""
    return max(1, -(-total // world))


def batch_note(total: int, world: int, what: str = "batch") -> str:
    """"" when ``total`` splits evenly over ``world`` workers, else what a step really takes, for the log."""
    effective = per_rank(total, world) * world
    if effective == total:
        return ""
    return f" (effective {what} {effective}: {per_rank(total, world)} per worker on {world} workers)"


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
    import json

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
    import json

    path, peaks = Path(run_dir) / COSTS_FILE, {}
    if not path.is_file():
        return peaks
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        for key, name in PEAK_NAMES:
            if key in entry:
                peaks[name] = max(peaks.get(name, 0.0), float(entry[key]))
    return peaks


class Progress:
    """Rates of a stage: images/s since its (re)start and the ETA, logged with each step."""

    def __init__(self, total: int, start_step: int, images_per_step: int):
        self.total, self.start_step, self.images_per_step = total, start_step, images_per_step
        self.started = time.perf_counter()

    def rates(self, step: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        done = max(step - self.start_step, 1)
        return {"images_per_s": done * self.images_per_step / elapsed,
                "eta_s": (self.total - step) * elapsed / done, "seconds": elapsed}


def progress_text(stage: str, total: int, record: dict[str, Any]) -> str | None:
    """The log line of one metrics.jsonl record (a training step or an evaluation); None for others."""
    step = record.get("step")
    if record.get("resumed"):
        return f"[{stage}] resumed from checkpoint step {step}"
    if "loss" in record:
        losses = " ".join(f"{k} {v:.3f}" for k, v in record.items() if k.startswith("loss") and isinstance(v, float))
        extra = " ".join(f"{k} {record[k]:.2f}" for k in ("staleness_max", "wait_fraction") if k in record)
        rate = f" {record['images_per_s']:.1f} img/s ETA {_clock(record['eta_s'])}" if "eta_s" in record else ""
        return f"[{stage}] step {step}/{total} {losses}{rate}" + (f" {extra}" if extra else "") + _labels_text(record)
    evals = {k: v for k, v in record.items() if k.startswith("eval")}
    if evals:
        return f"[{stage}] evaluation at step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in evals.items())
    return None


def _labels_text(record: dict[str, Any]) -> str:
    """The pseudo-labels of a Mean-Teacher step beside the ground truth of the same views, where known."""
    if "pl/segments_per_image" not in record:
        return ""
    text = f" | labels {record['pl/segments_per_image']:.1f} segments/image"
    if "gt/segments_per_image" in record:
        text += f" (truth {record['gt/segments_per_image']:.1f})"
    for key, name in (("pl/thing_recall", "things found"), ("pl/thing_precision", "right")):
        if key in record:
            text += f", {name} {100 * record[key]:.0f}%"
    return text


class FollowMetrics:
    """While a stage runs, echo the records rank 0 appends to ``metrics.jsonl`` as progress lines.

    The driver prints them itself, so they reach the driver log (and ``ray job logs``) whatever Ray does
    with worker output.
    """

    def __init__(self, path: Path, stage: str, total: int, echo, interval_s: float = 1.0):
        import threading

        self.path, self.stage, self.total, self.echo = path, stage, total, echo
        self.offset = path.stat().st_size if path.exists() else 0
        self.interval_s = interval_s
        self.seen = False  # whether a record of this run was echoed yet
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FollowMetrics:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)
        self._poll()

    def _run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            self._poll()

    def _poll(self) -> None:
        import json

        if not self.path.exists():
            return
        with open(self.path) as fh:
            fh.seek(self.offset)
            text = fh.read()
        complete = text[: text.rfind("\n") + 1]
        self.offset += len(complete.encode())
        for line in complete.splitlines():
            try:
                line_text = progress_text(self.stage, self.total, json.loads(line))
            except ValueError:
                continue
            if line_text:
                # a resume after this driver saw the stage run: Ray Train restarted its workers
                self.echo(line_text + (" after a restart" if self.seen and "resumed from" in line_text else ""))
                self.seen = True


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class StageError(DearliError):
    """A training stage that failed after using up its retries."""


def check_fit_result(result: Any, stage: str) -> None:
    """Turn a failed Ray Train result into one clear error line."""
    error = getattr(result, "error", None)
    if error is not None:
        raise StageError(f"{stage} stage failed: {error}") from error


def shuffled_rows(shard: Any, seed: int, buffer: int = 64):
    """The rows of a dataset shard for one epoch, in a locally shuffled order that depends on ``seed``.

    Yields:
        one dict per row (column name -> value).
    """
    batches = shard.iter_batches(batch_size=16, batch_format="pandas", local_shuffle_buffer_size=buffer,
                                 local_shuffle_seed=seed)
    for frame in batches:
        yield from frame.to_dict("records")
