"""What a Ray Train stage (DeWa warm-up, Mean Teacher) asks of Ray Train, and what its workers get.

A stage is a ``TorchTrainer`` whose training function runs on ``train.num_workers`` workers (DDP; GPUs
when the cluster has them): its scaling and run configs, the config and paths that travel to the workers, a
worker's device and threads, its share of a batch and of a Ray Data shard, and the fit result as one error.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dearli.config import Config
from dearli.config_io import from_dict, to_dict
from dearli.errors import DearliError
from dearli.runtime import cluster_has_gpus, gpu_share, quiet
from dearli.training.run_dir import prepare_run_dir

if TYPE_CHECKING:
    from dearli.data.dataset import DatasetInfo


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
    from dearli.model.backbone import check_clip_weights

    backbone = cfg.model.backbone
    check_clip_weights(backbone.clip_model, str(Path(backbone.pretrained).expanduser()) if backbone.pretrained else "")
    if backbone.pretrained and Path(backbone.pretrained).expanduser().is_file():
        backbone = dataclasses.replace(backbone, pretrained=absolute(backbone.pretrained))
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset=absolute(cfg.data.dataset)),
                               model=dataclasses.replace(cfg.model, backbone=backbone))


def prepare_stage_dir(run_dir: str | Path, cfg: Config, resume: bool) -> Path:
    """The stage's run directory (absolute: its workers may run elsewhere) with its config; see
    :func:`dearli.training.run_dir.prepare_run_dir`."""
    return prepare_run_dir(Path(run_dir).expanduser().resolve(), cfg, resume)


def loop_config(cfg: Config, run_dir: Path, **extra: Any) -> dict[str, Any]:
    """The picklable ``train_loop_config``: the resolved config as a dict, the run dir, anything else."""
    return {"cfg": to_dict(cfg), "run_dir": str(run_dir), **extra}


def share_train_split(info: DatasetInfo, cfg: Config) -> Any:
    """The train split, parsed here once, in Ray's object store (an ObjectRef for :func:`worker_dataset`): every
    Train worker and teacher actor reads it from there instead of parsing the JSON again (about 10 s and a
    few hundred MiB at 10^5 images)."""
    import ray

    return ray.put(info.split(cfg.data.train_split))


def worker_dataset(cfg: Config, train_split: Any = None) -> DatasetInfo:
    """The dataset of ``cfg`` in a worker or actor, its train split the driver's (:func:`share_train_split`:
    an ObjectRef, or the split itself when Ray passed it by value); None parses it here when asked for."""
    import ray

    from dearli.data.dataset import load_dataset

    info = load_dataset(cfg.data.dataset)
    if train_split is not None:
        split = ray.get(train_split) if isinstance(train_split, ray.ObjectRef) else train_split
        info.adopt_split(cfg.data.train_split, split)
    return info


@dataclass(frozen=True)
class Worker:
    """A Train worker as its training function starts: its config, run directory, rank, world size, device."""

    cfg: Config
    run_dir: Path
    rank: int
    world: int
    device: torch.device


def start_worker(config: dict[str, Any], stage: str) -> Worker:
    """What every Train worker does first, from its ``train_loop_config``: logging as quiet as the driver's,
    ``train.threads_per_worker`` torch threads, its line in ``workers.jsonl``, its device."""
    import ray.train

    from dearli.stages.costs import record_worker

    quiet(config.get("verbose", False))
    cfg = from_dict(Config, config["cfg"])
    run_dir = Path(config["run_dir"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    set_worker_threads(cfg)
    record_worker(run_dir, stage, rank)
    return Worker(cfg, run_dir, rank, world, worker_device(cfg))


def worker_device(cfg: Config) -> torch.device:
    """The device of a Train worker: ``train.device`` when set, else (auto) the one Ray Train assigned."""
    from ray.train.torch import get_device

    from dearli.device import resolve_device

    return get_device() if cfg.train.device == "auto" else resolve_device(cfg.train.device)


def set_worker_threads(cfg: Config) -> None:
    """``train.threads_per_worker`` torch threads in this worker (0 leaves Ray's choice)."""
    if cfg.train.threads_per_worker:
        torch.set_num_threads(cfg.train.threads_per_worker)


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
