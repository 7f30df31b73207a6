"""Stage 3, Mean Teacher on Ray Train, with the teacher as a separate actor pool (see :mod:`.teacher`).

Each student step (DDP over ``train.num_workers`` workers): ``ssl.labeled_batch_size`` labeled images
(supervised M2F-Lang loss) + ``ssl.unlabeled_batch_size`` strongly perturbed unlabeled images (colour
jitter, grayscale, blur, CutMix of two views with their pseudo-labels merged) against the teacher's hard
panoptic pseudo-labels, weighted by ``ssl.unlabeled_weight``. Rank 0 keeps the EMA teacher (decay
``ssl.ema_decay``; the frozen backbone is shared, never averaged) and publishes it to the teacher pool every
``ssl.publish_every`` steps. Evaluation (teacher and student, with and without the CLIP ensemble) every
``train.eval_every`` steps and at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dearli import runtime
from dearli.config import Config
from dearli.stages import ray_train
from dearli.stages.progress import FollowMetrics
from dearli.stages.student import STAGE, VARIANTS
from dearli.stages.tracking import DIAGNOSTIC_TAG, TrackingSpec
from dearli.training.checkpoint import checkpoint_path

# What a run with ssl.oracle_labels says, in its log and as an MLflow tag: its figures are a ceiling, not a result.
ORACLE_WARNING = ("DIAGNOSTIC RUN: ssl.oracle_labels=true, the student's unlabeled branch trains on the GROUND "
                  "TRUTH of the unlabeled images, not on the teacher's pseudo-labels; its metrics measure the ceiling "
                  "of the semi-supervised branch and are no semi-supervised result")
ORACLE_TAG = DIAGNOSTIC_TAG  # on its MLflow runs and its registered model version


def run_mean_teacher(cfg: Config, run_dir: str | Path, init: str | None = None, resume: bool = False, echo=print,
                     tracking: TrackingSpec | None = None, evaluate: bool = True) -> dict[str, Any]:
    """Train student and teacher; returns {"step", "checkpoint", "metrics", "run_dir"} (see module doc).

    ``init``: a checkpoint (e.g. the warm-up's) whose weights start both student and teacher.
    ``evaluate``: False skips every evaluation (benchmarks).
    """
    import ray
    from ray.train.torch import TorchTrainer

    from dearli.data.dataset import load_dataset
    from dearli.stages.teacher import start_teacher_pool, stop_teacher_pool
    from dearli.training.supervised import labeled_stems

    _check_schedule(cfg)
    cfg, init = ray_train.with_absolute_paths(cfg), ray_train.absolute(init)
    info = load_dataset(cfg.data.dataset)
    labeled = labeled_stems(info, cfg)
    labeled_set = set(labeled)  # once: per record it made the filter O(images × labeled)
    unlabeled = [stem for stem in info.split(cfg.data.train_split).stems if stem not in labeled_set]
    if not unlabeled:
        from dearli.errors import DataError

        raise DataError(cfg.data.dataset, f"partition {cfg.data.partition!r} leaves no unlabeled image")
    run_dir = ray_train.prepare_stage_dir(run_dir, cfg, resume)
    runtime.ensure_ray()
    train_split = ray_train.share_train_split(info, cfg)  # the workers and teachers read it, not the JSON
    fraction = len(labeled) / (len(labeled) + len(unlabeled))
    worker_gpus, teacher_gpus = ray_train.ssl_gpus(cfg, runtime.cluster_gpus())
    # A run that already holds its last checkpoint takes no step, it only finishes its evaluation: the
    # teacher pool (actors, and GPUs on a cluster) would wait for requests that never come.
    finished = resume and checkpoint_path(run_dir, cfg.train.max_steps).is_file()
    store, teachers = (None, []) if finished else start_teacher_pool(cfg, fraction, teacher_gpus, train_split)
    if cfg.ssl.oracle_labels:
        echo(f"[{STAGE}] *** {ORACLE_WARNING} ***")
    echo(_finishing_line(cfg, run_dir) if finished else _plan_line(cfg, labeled, unlabeled, len(teachers), run_dir))
    labeled_ds = ray.data.from_items([{"index": i} for i in range(len(labeled))])
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=ray_train.loop_config(cfg, run_dir, tracking=tracking, init=init, evaluate=evaluate,
                                             labeled=labeled, unlabeled=unlabeled, teachers=teachers,
                                             store=store, train_split=train_split),
        scaling_config=ray_train.scaling_config(cfg, worker_gpus),
        run_config=ray_train.run_config(cfg, run_dir, STAGE),
        datasets={"labeled": labeled_ds},
    )
    try:
        with FollowMetrics(run_dir / "metrics.jsonl", STAGE, cfg.train.max_steps, echo):
            result = trainer.fit()
    finally:
        stop_teacher_pool(store, teachers)
    ray_train.check_fit_result(result, STAGE)
    final = checkpoint_path(run_dir, cfg.train.max_steps)
    metrics = _final_metrics(run_dir, cfg.train.max_steps)
    for variant, summary in metrics.items():
        echo(f"[{STAGE}] {variant}: " + ", ".join(f"{k} {v:.2f}" for k, v in summary.items()))
    return {"step": cfg.train.max_steps, "checkpoint": str(final), "metrics": metrics, "run_dir": str(run_dir)}


def _check_schedule(cfg: Config) -> None:
    if cfg.ssl.burn_in_steps >= cfg.train.max_steps:
        from dearli.errors import ConfigError

        raise ConfigError(f"ssl.burn_in_steps: {cfg.ssl.burn_in_steps} burn-in steps leave none of the "
                          f"{cfg.train.max_steps} steps (train.max_steps) to the unlabeled images; lower it "
                          "(ssl.burn_in_steps=0 turns it off)")


def _plan_line(cfg: Config, labeled: list[str], unlabeled: list[str], teachers: int, run_dir: Path) -> str:
    return (f"[{STAGE}] {len(labeled)} labeled + {len(unlabeled)} unlabeled images of {cfg.data.dataset}; "
            f"{cfg.train.max_steps} steps of {cfg.ssl.labeled_batch_size}+{cfg.ssl.unlabeled_batch_size} images"
            f"{ray_train.batch_note(cfg.ssl.labeled_batch_size, cfg.train.num_workers, 'labeled batch')}"
            f"{ray_train.batch_note(cfg.ssl.unlabeled_batch_size, cfg.train.num_workers, 'unlabeled batch')} on "
            f"{cfg.train.num_workers} worker(s), {teachers} teacher actor(s); run dir {run_dir}")


def _finishing_line(cfg: Config, run_dir: Path) -> str:
    return (f"[{STAGE}] {run_dir} holds the last checkpoint (step {cfg.train.max_steps}): no step left, so no "
            "teacher pool; the workers finish the evaluation")


def _final_metrics(run_dir: Path, step: int) -> dict[str, dict[str, float]]:
    import json

    out = {}
    for variant in VARIANTS:
        path = run_dir / "eval" / variant / f"step_{step:07d}" / "metrics.json"
        if path.is_file():
            out[variant] = json.loads(path.read_text())["summary"]
    return out


def _train_loop(config: dict[str, Any]) -> None:
    """The training function each Ray Train worker runs."""
    from dearli.stages.student import StudentLoop

    StudentLoop(config).run()
