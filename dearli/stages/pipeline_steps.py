"""The stages of a pipeline run, each skipped when its output exists and tracked as a nested MLflow run.

Finished stages are recorded in the run's ``stages.json`` (their result dicts); a continued run reuses
them and hands the rest ``resume=True`` so an interrupted stage continues from its last checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dearli import runtime
from dearli.caches import plan as cache_plan
from dearli.config import Config
from dearli.stages.tracking import PipelineTracker


@dataclass
class StageContext:
    cfg: Config
    run_dir: Path
    tracker: PipelineTracker
    state: dict[str, Any]  # stage -> result of a finished stage
    save_state: Callable[[dict[str, Any]], None]
    echo: Callable[[str], Any]

    def finished(self, stage: str, *path_keys: str) -> dict[str, Any] | None:
        """The recorded result of ``stage`` if its files still exist (a deleted output runs it again)."""
        result = self.state.get(stage)
        if result is None or any(not Path(result[k]).exists() for k in path_keys):
            return None
        return result

    def record(self, stage: str, result: dict[str, Any]) -> None:
        self.state[stage] = result
        self.save_state(self.state)

    @contextmanager
    def measured(self, stage: str, stage_dir: Path | None = None) -> Iterator[None]:
        """What ``stage`` cost, recorded under "costs" in ``stages.json`` and logged to MLflow
        (``cost/<stage>/seconds``, ``.../driver_peak_mb``, and the workers' peaks they wrote in ``stage_dir``).
        The driver's peak is the process's peak so far: it never goes down from one stage to the next."""
        from dearli.stages.costs import peak_rss_mb, worker_peaks

        started = time.perf_counter()
        yield
        cost = {"seconds": time.perf_counter() - started, "driver_peak_mb": peak_rss_mb(),
                **(worker_peaks(stage_dir) if stage_dir is not None else {})}
        self.state.setdefault(COSTS, {})[stage] = cost
        self.save_state(self.state)
        # On the pipeline's run and on the stage's nested run.
        self.tracker.log_metrics({f"cost/{stage}/{k}": v for k, v in cost.items()}, 0,
                                 (self.tracker.stage_run(stage),))


COSTS = "costs"  # the key of stages.json that holds each stage's seconds and peak memory


def cost_lines(state: dict[str, Any]) -> list[str]:
    """One line per measured stage: seconds and peak memory (MiB) of the driver, a Train worker, a teacher, and
    on CUDA their GPU memory."""
    names = (("driver_peak_mb", "driver"), ("worker_peak_mb", "Train worker"), ("teacher_peak_mb", "teacher actor"),
             ("worker_gpu_peak_mb", "GPU of a Train worker"), ("teacher_gpu_peak_mb", "GPU of a teacher actor"))
    lines = []
    for stage, cost in state.get(COSTS, {}).items():
        peaks = ", ".join(f"{label} {cost[key]:.0f} MiB" for key, label in names if key in cost)
        lines.append(f"cost of {stage}: {cost['seconds']:.0f} s; peak memory: {peaks}")
    return lines


def connect_ray() -> None:
    """The cluster in RAY_ADDRESS (set by ``ray job submit``), else a new local instance of this process."""
    runtime.ensure_ray()


def pretrain_clip(ctx: StageContext, cache_dir: Path) -> None:
    """Stage 1 in miniature: the project's CLIP (preset synth), pre-trained once into ``cache_dir`` and reused
    by every later run; its own line in stages.json and its own nested MLflow run. Nothing for other CLIPs."""
    from dearli.pretrain.resolve import is_project_clip, pretrain_project_clip

    path = ctx.cfg.model.backbone.pretrained
    if not is_project_clip(path, cache_dir):
        return
    if Path(path).exists():
        ctx.echo(f"clip: reusing the project's CLIP {path}")
        ctx.tracker.reused("clip", {"dearli.checkpoint": path})
        ctx.record("clip", {"checkpoint": path, "reused": True})
        return
    with ctx.tracker.stage("clip") as spec, ctx.measured("clip"):
        trained = pretrain_project_clip(cache_dir, ctx.echo)
        ctx.tracker.set_tags({"dearli.checkpoint": str(trained)}, spec.run_id)
    ctx.record("clip", {"checkpoint": str(trained)})


def cache_actors() -> int:
    """Actors per cache job: one per GPU, else half the logical CPUs (2 to 4) so Train can start next."""
    import ray

    resources = ray.cluster_resources()
    if resources.get("GPU", 0) >= 1:
        return int(resources["GPU"])
    return max(1, min(4, int(resources.get("CPU", 1)) // 2))


def caches(ctx: StageContext, generator: str) -> None:
    """SAM masks of the train split and CLIP features of the val split, computed only where missing."""
    cfg = ctx.cfg
    dataset = cfg.data.dataset
    jobs = [("sam", cache_plan.SAM_SPLIT, cfg.cache.sam_cache), ("clip", cache_plan.CLIP_SPLIT, cfg.cache.clip_cache)]
    tags = {"dearli.sam_cache": cfg.cache.sam_cache, "dearli.clip_cache": cfg.cache.clip_cache,
            "dearli.sam_generator": generator}
    missing = {kind: cache_plan.missing_images(uri, kind, dataset, split) for kind, split, uri in jobs}
    if not any(missing.values()):
        for kind, split, uri in jobs:
            ctx.echo(f"cache {kind}: reusing {uri} (every {split} image is cached)")
        ctx.tracker.reused("cache", tags)
        return
    with ctx.tracker.stage("cache") as spec, ctx.measured("cache"):
        ctx.tracker.set_tags(tags, spec.run_id)
        actors = cache_actors()
        for kind, split, uri in jobs:
            if not missing[kind]:
                ctx.echo(f"cache {kind}: reusing {uri} (every {split} image is cached)")
                continue
            ctx.echo(f"cache {kind}: {missing[kind]} {split} images to compute into {uri} ({actors} actors)")
            cache_plan.build_cache(kind, cfg, generator, split, uri, actors, ctx.echo)


def _done_before(ctx: StageContext, stage: str) -> dict[str, Any] | None:
    """The recorded result of a finished training stage (said in the log and tagged in MLflow), or None."""
    done = ctx.finished(stage, "checkpoint")
    if done is not None:
        ctx.echo(f"{stage}: done before, reusing {done['checkpoint']}")
        ctx.tracker.reused(stage, {"dearli.checkpoint": done["checkpoint"]})
    return done


def warmup(ctx: StageContext) -> dict[str, Any]:
    """DeWa on the SAM cache; returns run_warmup's result."""
    done = _done_before(ctx, "warmup")
    if done is not None:
        return done
    from dearli.stages.warmup import run_warmup

    stage_dir = ctx.run_dir / "warmup"
    with ctx.tracker.stage("warmup") as spec, ctx.measured("warmup", stage_dir):
        result = run_warmup(ctx.cfg, stage_dir, ctx.cfg.cache.sam_cache, resume=stage_dir.exists(), echo=ctx.echo,
                            tracking=spec)
        ctx.tracker.set_tags({"dearli.checkpoint": result["checkpoint"]}, spec.run_id)
    ctx.record("warmup", result)
    return result


def mean_teacher(ctx: StageContext, init: str) -> dict[str, Any]:
    """Mean Teacher from the warmed-up model, ending with the evaluation of its four variants."""
    done = _done_before(ctx, "ssl")
    if done is not None:
        return done
    from dearli.stages.mean_teacher import ORACLE_TAG, ORACLE_WARNING, run_mean_teacher

    stage_dir = ctx.run_dir / "ssl"
    with ctx.tracker.stage("ssl") as spec, ctx.measured("ssl", stage_dir):
        if ctx.cfg.ssl.oracle_labels:
            for run_id in (None, spec.run_id):  # the pipeline's run and the stage's
                ctx.tracker.set_tags({ORACLE_TAG: ORACLE_WARNING}, run_id)
        result = run_mean_teacher(ctx.cfg, stage_dir, init=init, resume=stage_dir.exists(), echo=ctx.echo,
                                  tracking=spec)
        ctx.tracker.set_tags({"dearli.checkpoint": result["checkpoint"]}, spec.run_id)
    ctx.record("ssl", result)
    return result
