"""The Mean-Teacher training function of one Ray Train worker (see :mod:`dearli.stages.mean_teacher`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch

from dearli.stages import checkpoints, costs, ray_train
from dearli.stages.progress import Progress
from dearli.stages.teacher import PseudoLabelFeed, published_weights
from dearli.stages.tracking import EVAL_PREFIXES, StepLogger
from dearli.training.data import PanopticTrainDataset
from dearli.training.hooks import EMAHook, EvalHook, Periodic, PeriodicCheckpointer
from dearli.training.loop import Hook, TrainLoop
from dearli.training.pseudo_labels import PseudoLabel

STAGE = "ssl"  # the stage's folder, Ray Train run and MLflow names: kept, so that saved runs resume
# Evaluated models: (name, which weights, CLIP ensemble on). The paper reports the ensembled teacher.
VARIANTS = {"teacher": ("teacher", True), "teacher_noens": ("teacher", False),
            "student": ("student", True), "student_noens": ("student", False)}


def views_per_step(unlabeled: int, cutmix_prob: float) -> int:
    """Weak views a rank asks the teacher for per step: its ``unlabeled`` images, and with CutMix on at least
    two, so every image has a partner of its own (another image, with its own teacher labels) to mix with,
    whatever the number of workers; the student trains on the first ``unlabeled``."""
    return max(unlabeled, 2) if cutmix_prob > 0 else unlabeled


def unpack_pseudo_labels(result: dict[str, Any]) -> tuple[torch.Tensor, list[PseudoLabel]]:
    """A teacher's answer (see ``TeacherWorker.label``) -> (B×3×S×S uint8 weak views, B ``PseudoLabel``).

    Arrays that come out of Ray's object store are read-only views of shared memory: they are copied, so the
    student's tensors own writable memory (torch would warn about, and must not write into, the others).
    """
    images = torch.from_numpy(np.array(result["images"]))
    labels = [PseudoLabel(torch.from_numpy(np.array(p)), s, torch.from_numpy(np.array(v)))
              for p, s, v in zip(result["panoptic"], result["segments"], result["valid"])]
    return images, labels


def truth_rates(sums: dict[str, float]) -> dict[str, float]:
    """The teacher's labels against the ground truth of the same weak views (see ``teacher.truth_stats``):
    gt/segments_per_image, gt/things_per_image, pl/thing_recall (true things found with the right class),
    pl/thing_precision (labelled things that are right); {} when the images have no annotation."""
    if not sums.get("images"):
        return {}
    out = {"gt/segments_per_image": sums["gt_segments"] / sums["images"],
           "gt/things_per_image": sums["gt_things"] / sums["images"]}
    if sums["gt_things"]:
        out["pl/thing_recall"] = sums["matched_things"] / sums["gt_things"]
    if sums["pl_things"]:
        out["pl/thing_precision"] = sums["matched_things"] / sums["pl_things"]
    return out


class StudentLoop:
    """State of one worker: student (DDP), rank 0's EMA teacher, optimiser, data and pseudo-label feed."""

    def __init__(self, config: dict[str, Any]):
        from dearli.training.mean_teacher import unlabeled_criterion
        from dearli.training.parts import build_training_parts

        worker = ray_train.start_worker(config, STAGE)
        self.cfg = cfg = worker.cfg
        self.run_dir, self.rank, self.world, self.device = worker.run_dir, worker.rank, worker.world, worker.device
        self.teacher_peak_mb = 0.0  # the largest peak memory a teacher actor reported with its labels
        self.teacher_gpu_peak_mb = 0.0  # ... and of GPU memory, on CUDA
        self.info = ray_train.worker_dataset(cfg, config.get("train_split"))
        self.split = self.info.split(cfg.data.train_split)
        parts = build_training_parts(cfg, self.info.categories.synonyms, self.info.categories.num_classes,
                                     self.device, cfg.train.max_steps, cfg.ssl.precision == "amp")
        self.parts, self.model = parts, parts.model
        self.criterion_u = unlabeled_criterion(cfg, self.info.categories.num_classes,
                                               self.info.categories.thing_ids, self.parts.criterion).to(self.device)
        self.teacher = None
        self.state = {"epoch": 0, "position": 0}  # where in the shuffled labeled shard the next batch starts
        start, self.warm_started = self._restore(config.get("init"))
        self.loop = TrainLoop(self.parts.scheduler, cfg.train.max_steps, start)
        self.logger = StepLogger(self.run_dir / "metrics.jsonl", config["tracking"]) if self.rank == 0 else None
        self.labeled = config["labeled"]
        self.evaluate = config.get("evaluate", True)
        self.store = config["store"]
        self.feed = PseudoLabelFeed(config["teachers"], config["unlabeled"],
                                    views_per_step(ray_train.per_rank(cfg.ssl.unlabeled_batch_size, self.world),
                                                   cfg.ssl.cutmix_prob), self.rank, self.world,
                                    cfg.train.seed, cfg.ssl.prefetch, cfg.ssl.max_staleness, self.step,
                                    cfg.ssl.burn_in_steps)
        self.window: dict[str, list[float]] = {}
        self.teacher_nodes: set[str] = set()  # Ray nodes whose teacher actors labelled this worker's batches

    @property
    def step(self) -> int:
        """Steps taken so far (in a hook: the step just taken)."""
        return self.loop.step

    def _restore(self, init: str | None) -> tuple[int, bool]:
        """Resume from Ray Train's checkpoint, else start from ``init``; rank 0 builds the EMA teacher.
        Returns (the step to start from, whether the student starts from trained weights)."""
        from dearli.training.checkpoint import load_checkpoint, restore
        from dearli.training.ema import load_trainable_state, make_teacher

        start, payload = 0, checkpoints.latest_stage_checkpoint(self.device, self.run_dir)
        if payload is not None:  # SSL checkpoints hold the teacher as "model", the student in extra
            self.parts.restore({**payload, "model": payload["extra"]["student"]})
            start = int(payload["step"])
            self.state = {"epoch": payload["extra"]["epoch"], "position": payload["extra"]["position"]}
        elif init:
            restore(self.model, load_checkpoint(init, self.device))
        if self.rank == 0:
            self.teacher = make_teacher(self.model)
            if payload is not None:
                load_trainable_state(self.teacher, payload["extra"]["teacher"])
        return start, payload is not None or bool(init)

    def run(self) -> None:
        from ray.train.torch import prepare_model

        from dearli.training.data import resumable_batches

        self.ddp = prepare_model(self.model, parallel_strategy_kwargs={"find_unused_parameters": True})
        if self.step < self.cfg.train.max_steps:
            self._publish()
        per_step = (ray_train.per_rank(self.cfg.ssl.labeled_batch_size, self.world)
                    + ray_train.per_rank(self.cfg.ssl.unlabeled_batch_size, self.world)) * self.world
        self.progress = Progress(self.cfg.train.max_steps, self.step, per_step)
        self.loop.hooks = self._hooks()
        dataset = PanopticTrainDataset(self.split, self.labeled, self.cfg.data, seed=self.cfg.train.seed + self.rank)
        shard = ray.train.get_dataset_shard("labeled")

        def rows(epoch: int):
            dataset.set_epoch(epoch)
            return ray_train.shuffled_rows(shard, self.cfg.train.seed + epoch, buffer=16)

        batches = resumable_batches(rows, lambda epoch, index, row: dataset[int(row["index"])],
                                    ray_train.per_rank(self.cfg.ssl.labeled_batch_size, self.world), self.state)
        try:
            self.loop.run(batches, self._train_step)
        finally:
            self.feed.close()
            teacher_gpu = {"teacher_gpu_peak_mb": self.teacher_gpu_peak_mb} if self.teacher_gpu_peak_mb else {}
            costs.record_cost(self.run_dir, STAGE, self.rank, peak_rss_mb=costs.peak_rss_mb(),
                               teacher_peak_rss_mb=self.teacher_peak_mb, **costs.peak_gpu_mb(), **teacher_gpu)

    def _hooks(self) -> list[Hook]:
        """Rank 0's EMA teacher and its publication to the teacher pool, the log, the checkpoints and (rank 0)
        the evaluations: after every step in this order, the final evaluation after training (also when a
        restart after the last checkpoint has no step left)."""
        cfg = self.cfg
        hooks: list[Hook] = []
        if self.rank == 0:
            hooks += [EMAHook(self.teacher, self.model, self._decay_at),
                      Periodic(cfg.ssl.publish_every, lambda at, logged: self._publish(), at_last=False)]
        hooks += [Periodic(cfg.train.log_every, self._log),
                  PeriodicCheckpointer(cfg.train.checkpoint_every, self._checkpoint)]
        if self.rank == 0 and self.evaluate:
            hooks.append(EvalHook(cfg.train.eval_every, self._evaluate))
        return hooks

    def _train_step(self, labeled_batch: dict[str, Any]) -> dict[str, float]:
        """One student step on a labeled batch and this step's pseudo-labelled views (none during the burn-in,
        see ``ssl.burn_in_steps``: no label is asked for, no view made); its numbers are kept for the next log
        line."""
        from dearli.training.mean_teacher import mean_teacher_step

        started = time.perf_counter()
        fed = self.feed.next(self.step + 1)
        unlabeled_batch, pl_stats = (None, {}) if fed is None else self._unlabeled_batch(fed[0])
        logged = mean_teacher_step(self.ddp, self.parts.criterion, self.parts.optimizer, labeled_batch, unlabeled_batch,
                                   self.cfg, self.parts.scaler, self.device,
                                   0.0 if fed is None else self.cfg.ssl.unlabeled_weight, self.criterion_u)
        values = {**logged, **pl_stats}
        if fed is not None:
            stats, seconds = fed[1], time.perf_counter() - started
            values.update(staleness=stats.staleness, wait_fraction=stats.wait_s / max(seconds, 1e-9),
                          relabelled=stats.relabelled, teacher_version=stats.version)
            self.teacher_nodes.add(stats.node_id)
        for key, value in values.items():
            self.window.setdefault(key, []).append(float(value))
        return logged

    def _unlabeled_batch(self, result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
        """Strong views (+ CutMix) of a teacher's answer (weak views with their pseudo-labels) in collate
        format, and the labels' statistics."""
        from dearli.training.pseudo_labels import collate_pseudo, pseudo_label_stats
        from dearli.training.strong_augment import student_view

        self.teacher_peak_mb = max(self.teacher_peak_mb, float(result.get("peak_rss_mb", 0.0)))
        self.teacher_gpu_peak_mb = max(self.teacher_gpu_peak_mb, float(result.get("gpu_peak_mb", 0.0)))
        self._record_failures()
        images, labels = unpack_pseudo_labels(result)
        generator = torch.Generator().manual_seed(hash((self.cfg.train.seed, self.rank, self.step)) & 0x7FFFFFFF)
        count = min(len(labels), ray_train.per_rank(self.cfg.ssl.unlabeled_batch_size, self.world))
        views, mixed = [], []
        for i in range(count):
            j = (i + 1) % len(labels)  # CutMix partner: the next view (views_per_step asks for at least two)
            view, label, _ = student_view(images[i], labels[i], images[j], labels[j],
                                          self.cfg.ssl.cutmix_prob if j != i else 0.0, generator,
                                          self.cfg.ssl.strong_view)
            views.append(view)
            mixed.append(label)
        ssl = self.cfg.ssl
        batch = collate_pseudo(views, mixed, ssl.min_confidence, result["stems"][:count], ssl.thing_floor())
        pl_stats = {f"pl/{k}": v for k, v in pseudo_label_stats(labels, ssl.min_confidence, ssl.thing_floor()).items()}
        pl_stats.update(truth_rates(result.get("truth") or {}))
        return batch, pl_stats

    def _decay_at(self, step: int) -> float:
        """The EMA decay after ``step``: 0 (a copy of the student) until the burn-in ends, then the schedule."""
        from dearli.training.ema import ema_decay

        burn_in = self.cfg.ssl.burn_in_steps
        if step <= burn_in:
            return 0.0
        # The update after the first step is update 0 (upstream numbers it by the 0-based iteration).
        return ema_decay(step - 1, self.cfg.ssl.ema_decay, ramp=not self.warm_started and not burn_in)

    def _publish(self) -> None:
        """Rank 0 hands the current EMA weights (version = step) to the teacher pool."""
        if self.rank == 0:
            state = published_weights(self.teacher, random_backbone=self.cfg.model.backbone.pretrained == "")
            ray.get(self.store.publish.remote(self.step, state))

    def _record_failures(self) -> None:
        """Unreadable unlabeled images: appended to the run's errors table (errors.jsonl) and skipped from now on."""
        if not self.feed.failed:
            return
        with open(self.run_dir / "errors.jsonl", "a") as fh:
            for stem, path, reason in self.feed.failed:
                fh.write(json.dumps({"stage": STAGE, "step": self.step, "stem": stem, "path": path,
                                     "reason": reason, "rank": self.rank}) + "\n")
        self.feed.failed.clear()

    def _log(self, step: int, logged: dict[str, float]) -> None:
        if self.logger is None:
            return
        values = {k: sum(v) / len(v) for k, v in self.window.items()}
        if "staleness" in self.window:  # not during the burn-in: no label was asked for
            values["staleness_max"] = max(self.window["staleness"])
        values["lr"] = self.parts.optimizer.param_groups[0]["lr"]
        self.logger.log(self.step, {**values, **self.progress.rates(self.step),
                                    "teacher_nodes": sorted(self.teacher_nodes)})
        self.window = {}

    def _checkpoint(self, step: int, logged: dict[str, float]) -> None:
        from dearli.training.ema import trainable_state

        def write(folder: Path) -> Path:
            from dearli.training.checkpoint import model_state

            student = model_state(self.model, include_backbone=self.cfg.model.backbone.pretrained == "")
            extra = {"student": student, "teacher": trainable_state(self.teacher), **self.state, "stage": STAGE}
            return checkpoints.write_stage_checkpoint(folder, self.step, self.teacher, self.cfg, self.parts.optimizer,
                                                 self.parts.scheduler, extra)

        checkpoints.report_checkpoint(self.rank, self.run_dir, self.step, {"step": self.step, "loss": logged["loss"]},
                                 write)

    def _evaluate(self, step: int) -> None:
        """Every variant of VARIANTS on the validation split, skipping those already evaluated at ``step``."""
        from dearli.training.evaluator import evaluate_model

        for variant, (which, ensembled) in VARIANTS.items():
            out_dir = self.run_dir / "eval" / variant / f"step_{self.step:07d}"
            if (out_dir / "metrics.json").is_file():
                continue
            model = self.teacher if which == "teacher" else self.model
            alpha = None if ensembled else 0.0
            metrics = evaluate_model(model, self.cfg.model, self.info, self.cfg.data.val_split, out_dir,
                                     alpha_clip=alpha, progress=False, gt_cache_dir=self.run_dir / "eval" / "gt_cache")
            self.logger.log(self.step, {f"{EVAL_PREFIXES[variant]}/{k}": v for k, v in metrics["summary"].items()})
        self.model.train()
