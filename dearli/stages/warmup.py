"""Stage 2, DeWa: class-agnostic warm-up of the pixel and transformer decoders on SAM masks (Ray Train).

The SAM cache (Parquet, from ``dearli cache sam``) of every training image, labeled and unlabeled, is
read by Ray Data and split across the Train workers with ``get_dataset_shard``; each worker decodes the
masks of its rows, augments image and masks alike and trains with mask BCE + dice only (the class loss
is multiplied by 0). The frozen backbone gets no gradient; the classifier is left as it is, and the
warmed-up model initialises the Mean-Teacher stage (``dearli train ssl --init``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from dearli import runtime
from dearli.config import Config
from dearli.errors import DataError
from dearli.stages import checkpoints, costs, ray_train
from dearli.stages.progress import FollowMetrics, Progress
from dearli.stages.tracking import StepLogger, TrackingSpec
from dearli.training.checkpoint import checkpoint_path

STAGE = "warmup"


def warmup_config(cfg: Config) -> Config:
    """The stage's effective config: class-agnostic loss (class weight 0)."""
    loss = dataclasses.replace(cfg.model.loss, class_weight=0.0)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, loss=loss))


def run_warmup(cfg: Config, run_dir: str | Path, sam_cache: str, resume: bool = False, echo=print,
               tracking: TrackingSpec | None = None) -> dict[str, Any]:
    """Warm up the decoder on the SAM cache ``sam_cache``; returns {"step", "checkpoint", "run_dir"}."""
    from ray.train.torch import TorchTrainer

    from dearli.caches.readers import read_sam_cache, without_masks
    from dearli.data.dataset import load_dataset

    cfg = ray_train.with_absolute_paths(cfg)
    sam_cache = sam_cache if "://" in str(sam_cache) else str(Path(sam_cache).expanduser().resolve())
    reader = read_sam_cache(sam_cache)  # checks that it is a SAM cache before anything starts
    if len(reader) == 0:
        raise DataError(sam_cache, "the SAM cache holds no images; run 'dearli cache sam' on the train split")
    empty = len(without_masks(reader))
    if empty == len(reader):
        raise DataError(sam_cache, f"none of the SAM cache's {len(reader)} images holds a mask: the warm-up would "
                        "learn nothing (loss 0). Check cache.sam_checkpoint against cache.sam_type, or lower "
                        "cache.pred_iou_thresh / cache.stability_score_thresh, and build the cache again")
    run_dir = ray_train.prepare_stage_dir(run_dir, cfg, resume)
    runtime.ensure_ray()
    train_split = ray_train.share_train_split(load_dataset(cfg.data.dataset), cfg)
    parts = reader.store.part_files()
    # Ray Data pushes the column selection down into the Parquet scan: the other columns are never read.
    dataset = runtime.read_parquet(parts, filesystem=reader.store.fs).select_columns(
        ["stem", "rle_counts", "height", "width"])
    if empty:
        echo(f"[{STAGE}] WARNING {empty} of {len(reader)} images of the SAM cache hold no mask (they teach only "
             "'no object')")
    echo(f"[{STAGE}] {len(reader)} images with SAM masks from {sam_cache}; {cfg.warmup.max_steps} steps, "
         f"batch {cfg.warmup.batch_size}{ray_train.batch_note(cfg.warmup.batch_size, cfg.train.num_workers)} on "
         f"{cfg.train.num_workers} worker(s); run dir {run_dir}")
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=ray_train.loop_config(cfg, run_dir, tracking=tracking, num_images=len(reader),
                                             train_split=train_split),
        scaling_config=ray_train.scaling_config(cfg),
        run_config=ray_train.run_config(cfg, run_dir, STAGE),
        datasets={"sam": dataset},
    )
    with FollowMetrics(run_dir / "metrics.jsonl", STAGE, cfg.warmup.max_steps, echo):
        result = trainer.fit()
    ray_train.check_fit_result(result, STAGE)
    final = checkpoint_path(run_dir, cfg.warmup.max_steps)
    echo(f"[{STAGE}] done: {final}")
    return {"step": cfg.warmup.max_steps, "checkpoint": str(final), "run_dir": str(run_dir)}


def _train_loop(config: dict[str, Any]) -> None:
    """The training function each Ray Train worker runs."""
    import ray.train
    from ray.train.torch import prepare_model

    from dearli.caches.readers import decode_masks
    from dearli.training.data import resumable_batches
    from dearli.training.hooks import Periodic, PeriodicCheckpointer
    from dearli.training.loop import TrainLoop
    from dearli.training.parts import build_training_parts
    from dearli.training.warmup_data import sam_sample, sample_generator

    worker = ray_train.start_worker(config, STAGE)
    cfg, run_dir, rank, world, device = (warmup_config(worker.cfg), worker.run_dir, worker.rank, worker.world,
                                         worker.device)
    info = ray_train.worker_dataset(cfg, config.get("train_split"))
    split = info.split(cfg.data.train_split)
    parts = build_training_parts(cfg, info.categories.synonyms, info.categories.num_classes, device,
                                 cfg.warmup.max_steps, cfg.train.amp)
    model, optimizer, scheduler = parts.model, parts.optimizer, parts.scheduler
    step, state = 0, {"epoch": 0, "position": 0}  # where in the shuffled shard the next batch starts
    if (payload := checkpoints.latest_stage_checkpoint(device, run_dir)) is not None:
        step = parts.restore(payload)
        state = {"epoch": payload["extra"]["epoch"], "position": payload["extra"]["position"]}
    ddp = prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    per_worker = ray_train.per_rank(cfg.warmup.batch_size, world)
    logger = StepLogger(run_dir / "metrics.jsonl", config["tracking"]) if rank == 0 else None
    progress = Progress(cfg.warmup.max_steps, step, per_worker * world)

    def log(at: int, logged: dict[str, float]) -> None:
        if logger is not None:
            logger.log(at, {**logged, **progress.rates(at), "lr": optimizer.param_groups[0]["lr"]})

    def checkpoint(at: int, logged: dict[str, float]) -> None:
        def write(folder: Path) -> Path:
            extra = {**state, "stage": STAGE}
            return checkpoints.write_stage_checkpoint(folder, at, model, cfg, optimizer, scheduler, extra)

        checkpoints.report_checkpoint(rank, run_dir, at, {"step": at, "loss": logged["loss"]}, write)

    def sample(epoch: int, index: int, row: dict[str, Any]) -> dict[str, Any]:
        generator = sample_generator(cfg.train.seed + rank, epoch, index)
        return sam_sample(split.load_image(split.record(row["stem"])), decode_masks(row), row["stem"], cfg.data,
                          cfg.warmup, generator)

    shard = ray.train.get_dataset_shard("sam")
    batches = resumable_batches(lambda epoch: ray_train.shuffled_rows(shard, cfg.train.seed + epoch), sample,
                                per_worker, state)
    hooks = [Periodic(cfg.train.log_every, log), PeriodicCheckpointer(cfg.train.checkpoint_every, checkpoint)]
    TrainLoop(scheduler, cfg.warmup.max_steps, step, hooks).run(
        batches, lambda batch: parts.train_step(batch, cfg, ddp))
    costs.record_cost(run_dir, STAGE, rank, peak_rss_mb=costs.peak_rss_mb(), **costs.peak_gpu_mb())

