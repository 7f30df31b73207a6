"""The whole DEARLi pipeline as one command (the ``jobs/ssl.py`` Ray job), tracked in MLflow.

dataset -> SAM cache (train split) and CLIP cache (val split) -> DeWa warm-up -> Mean Teacher (ends with
the evaluation of teacher and student, with and without the zero-shot ensemble) -> evaluation report:
per-class table, visualisations, loss curves, the final teacher registered as an MLflow model version.

A run is named (``--run-name``, default the next free ``ssl_NNN``) and lives in ``<workdir>/runs/<name>``.
Running the same name again continues it, as a Ray Train run of the same name does: every stage whose
output exists is skipped, an interrupted stage resumes from its last checkpoint, and MLflow logging
goes on in the same parent run. ``--resume`` alone continues the most recent run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dearli.caches import plan as cache_plan
from dearli.config import DEFAULT_WORKDIR, Config, load_config
from dearli.config_io import flatten_params, to_dict
from dearli.errors import ConfigError, DearliError
from dearli.pretrain.resolve import CACHE_FOLDER, resolve_clip
from dearli.stages import tracking, workspace

RUN_PREFIX = "ssl"
STATE_FILE = "stages.json"  # results of the finished stages of a run: what a continued run skips
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

echo = functools.partial(print, flush=True)  # a Ray job's stdout is a pipe: flush every line


@dataclass(frozen=True)
class PipelineOptions:
    dataset: str | None = None  # None = the synthetic world under the workdir
    partition: str = "1_8"
    preset: str = "synth"  # the synthetic world's preset: tiny model, the project's pretrained CLIP
    workdir: str | None = None  # None = DEFAULT_WORKDIR
    experiment: str = tracking.DEFAULT_EXPERIMENT
    run_name: str | None = None
    resume: bool = False
    overrides: tuple[str, ...] = ()
    num_images: int = 400  # synthetic world: training images
    val_images: int = 100  # synthetic world: validation images
    sam_generator: str | None = None  # sam | felzenszwalb; None = felzenszwalb for the synthetic world
    model_name: str = tracking.DEFAULT_MODEL_NAME
    visualise: int = 6  # validation images drawn by the report
    dry_run: bool = False  # resolve and check everything, print the plan, run nothing


def build_arg_parser(prog: str = "jobs/ssl.py") -> argparse.ArgumentParser:
    d = PipelineOptions()
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the whole DEARLi pipeline (SAM and CLIP caches, DeWa warm-up, Mean Teacher, evaluation "
        "of teacher and student) on Ray, tracked in MLflow. Without arguments: the synthetic world with the "
        "synth preset (--preset synth-quick: the same on a schedule of about half the time). Extra KEY=VALUE "
        "arguments override the configuration, e.g. ssl.ema_decay=0.99.",
        epilog="Outputs go to --workdir; MLflow goes to MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db. "
        "Running the same --run-name again continues that run (finished stages are skipped).")
    parser.add_argument("--dataset", default=None, metavar="DIR",
                        help="dataset directory with dataset.yaml (default: the synthetic world in the workdir)")
    parser.add_argument("--partition", default=d.partition, help=f"labeled partition (default: {d.partition})")
    parser.add_argument("--preset", default=d.preset,
                        help=f"config preset (default: {d.preset}; tiny, ade20k-base, ...) or a YAML file")
    parser.add_argument("--workdir", default=None, metavar="DIR",
                        help=f"where datasets, caches, runs and the local MLflow store go (default: "
                        f"{DEFAULT_WORKDIR})")
    parser.add_argument("--experiment", default=d.experiment, help=f"MLflow experiment (default: {d.experiment})")
    parser.add_argument("--run-name", default=None,
                        help=f"name of the run; an existing name continues that run (default: a new "
                        f"{RUN_PREFIX}_NNN)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run named by --run-name, or else the most recent run")
    parser.add_argument("--num-images", type=int, default=d.num_images, help="synthetic world: training images")
    parser.add_argument("--val-images", type=int, default=d.val_images, help="synthetic world: validation images")
    parser.add_argument("--sam-generator", choices=("sam", "felzenszwalb"), default=None,
                        help="masks of the SAM cache: sam (needs cache.sam_checkpoint=PATH) or felzenszwalb "
                        "(CPU stand-in, no weights); default: felzenszwalb for the synthetic world, else sam")
    parser.add_argument("--model-name", default=d.model_name,
                        help=f"registered MLflow model of the final teacher (default: {d.model_name})")
    parser.add_argument("--visualise", type=int, default=d.visualise, metavar="N",
                        help=f"validation images drawn as overlays (default: {d.visualise})")
    parser.add_argument("--dry-run", action="store_true",
                        help="resolve the run (directories, config, MLflow store), check them, print the plan, "
                        "run nothing")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="configuration overrides")
    return parser


def parse_options(argv: list[str] | None = None) -> PipelineOptions:
    from dearli.config import OVERRIDE

    parser = build_arg_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not all(OVERRIDE.match(token) for token in extra):  # KEY=VALUE may also follow options
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.run_name is not None and not _RUN_NAME.match(args.run_name):
        parser.error(f"--run-name {args.run_name!r}: use letters, digits, '.', '_' and '-'")
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(PipelineOptions) if hasattr(args, f.name)}
    values["overrides"] = (*args.overrides, *extra)
    return PipelineOptions(**values)


def choose_run(runs_dir: Path, run_name: str | None, resume: bool, claim: bool = False) -> tuple[str, Path]:
    """(name, directory) of the run: a named one (continued if it exists), the latest (--resume), or a new
    one (``claim``: its directory is created now, so that concurrent runs never share it)."""
    if run_name:
        if resume and not (runs_dir / run_name).is_dir():
            raise ConfigError(f"--resume: there is no run {run_name!r} in {runs_dir}")
        return run_name, runs_dir / run_name
    if resume:
        latest = workspace.latest_run_dir(runs_dir)
        if latest is None:
            raise ConfigError(f"--resume: there is no earlier run in {runs_dir} to continue")
        return latest.name, latest
    name = workspace.next_run_name(runs_dir, RUN_PREFIX, claim)
    return name, runs_dir / name


def build_config(opts: PipelineOptions, dataset: Path, workdir: Path, run_name: str) -> tuple[Config, str]:
    """The run's config (preset <- dataset/partition <- overrides <- cache locations); and the SAM generator."""
    overrides = [f"data.dataset={json.dumps(str(dataset))}", f"data.partition={json.dumps(opts.partition)}",
                 *opts.overrides]
    # Only the project CLIP's path: pre-training it is the pipeline's first step (steps.pretrain_clip).
    cfg = resolve_clip(load_config(opts.preset, overrides), workdir / CACHE_FOLDER, log=echo, train=False)
    generator = opts.sam_generator or ("felzenszwalb" if opts.dataset is None else "sam")
    if generator == "sam" and cfg.cache.sam_type != "tiny" and not cfg.cache.sam_cache and not cfg.cache.sam_checkpoint:
        raise ConfigError("cache.sam_checkpoint: SAM needs its weights file (cache.sam_checkpoint=PATH), or pass "
                          "an existing cache (cache.sam_cache=URI), or use --sam-generator felzenszwalb")
    cache = cfg.cache
    settings = cache_plan.cache_settings(cfg, generator)
    sam = cache.sam_cache or cache_plan.default_cache_uri(workdir, str(dataset), f"sam-{generator}", settings["sam"])
    clip = cache.clip_cache or cache_plan.default_cache_uri(workdir, str(dataset), "clip", settings["clip"])
    train = cfg.train
    if train.storage_path:  # a shared Train storage (e.g. s3://...) holds many runs: one folder per run name
        train = dataclasses.replace(train, storage_path=f"{train.storage_path.rstrip('/')}/{run_name}")
    cfg = dataclasses.replace(cfg, cache=dataclasses.replace(cache, sam_cache=sam, clip_cache=clip), train=train)
    return cfg, generator


def check_same_config(cfg: Config, run_dir: Path) -> None:
    """A continued run must keep its configuration (fields added since it started count as their defaults):
    the error names the keys that differ."""
    from dearli.config import config_differences

    path = run_dir / "config.yaml"
    differ = config_differences(cfg, path)
    if differ:
        raise ConfigError(f"{path}: run {run_dir.name!r} was started with another configuration ("
                          f"{', '.join(differ[:5])}); continue it with the same arguments or choose a new "
                          "--run-name")


def save_run_config(cfg: Config, run_dir: Path) -> None:
    """Write ``config.yaml`` (a continued run: after checking it is the same)."""
    from dearli.config import save_config

    if (run_dir / "config.yaml").is_file():
        check_same_config(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")


def check_dataset(cfg: Config) -> None:
    """A missing dataset, split or partition is a one-line error before anything starts."""
    from dearli.data.dataset import load_dataset

    info = load_dataset(cfg.data.dataset)
    for split in (cfg.data.train_split, cfg.data.val_split):
        info.split(split)
    if cfg.data.partition:
        info.partition(cfg.data.partition)


def check_weights(cfg: Config, generator: str, workdir: Path) -> None:
    """The weights files the run will load (CLIP always, SAM when its cache is built with it), checked for
    the configured models in this process before anything is computed: one line naming the file if not.
    The project's own CLIP, not yet pre-trained (a dry run), is not there to check."""
    from dearli.caches.generators import GeneratorSpec
    from dearli.model.backbone import check_clip_weights
    from dearli.pretrain.resolve import is_project_clip

    pretrained = cfg.model.backbone.pretrained
    if not (is_project_clip(pretrained, workdir / CACHE_FOLDER) and not Path(pretrained).exists()):
        check_clip_weights(cfg.model.backbone.clip_model, pretrained)
    if generator == "sam" and cfg.cache.sam_type != "tiny" and cfg.cache.sam_checkpoint:
        spec = GeneratorSpec(kind="sam", sam_type=cfg.cache.sam_type, sam_checkpoint=cfg.cache.sam_checkpoint)
        spec.validate()
        spec.check_weights()


def read_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_state(run_dir: Path, state: dict[str, Any]) -> None:
    """Atomic: a run killed while writing keeps the previous state."""
    tmp = run_dir / f".{STATE_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, run_dir / STATE_FILE)


def dry_run(cfg: Config, dataset: Path, run_dir: Path, generator: str, workdir: Path) -> dict[str, Any]:
    """Print what a run would use, after checking the config against the run's and the MLflow store."""
    import yaml

    uri = tracking.resolve_tracking_uri(workdir)
    if dataset.exists():  # else the synthetic world, written by the run
        check_dataset(cfg)
    if (run_dir / "config.yaml").is_file():
        check_same_config(cfg, run_dir)
    tracking.check_store(uri)
    state = "exists" if (dataset / "dataset.yaml").is_file() else "to be written: synthetic world"
    echo(f"dataset: {dataset} ({state})")
    echo(f"run: {run_dir} ({'continues' if run_dir.is_dir() else 'new'})")
    echo(f"sam cache ({generator}): {cfg.cache.sam_cache}")
    echo(f"clip cache: {cfg.cache.clip_cache}")
    echo(f"MLflow: {uri} (reachable)")
    echo("config:\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
    return {"run_dir": str(run_dir), "tracking_uri": uri, "config": to_dict(cfg)}


def run_pipeline(opts: PipelineOptions) -> dict[str, Any]:
    """Run (or continue) every stage; returns {"run_dir", "metrics", "model", "mlflow_run_id", ...}."""
    from dearli.stages import pipeline_steps as steps
    from dearli.stages import report

    started = time.perf_counter()
    workdir = workspace.resolve_workdir(opts.workdir)
    echo(f"workdir: {workdir}")
    if opts.dataset is None:
        dataset = workspace.synth_path(workdir, opts.num_images, opts.val_images)
    else:
        dataset = Path(opts.dataset).expanduser().resolve()
    run_name, run_dir = choose_run(workdir / "runs", opts.run_name, opts.resume)
    cfg, generator = build_config(opts, dataset, workdir, run_name)  # a bad config stops before any write
    check_weights(cfg, generator, workdir)
    if opts.dry_run:
        return dry_run(cfg, dataset, run_dir, generator, workdir)
    if opts.run_name is None and not opts.resume:  # a new run: take its name for good
        run_name, run_dir = choose_run(workdir / "runs", None, False, claim=True)
        cfg, generator = build_config(opts, dataset, workdir, run_name)
    if opts.dataset is None:
        workspace.synth_dataset(workdir, opts.num_images, opts.val_images, echo)
    check_dataset(cfg)
    continuing = (run_dir / "config.yaml").is_file()
    save_run_config(cfg, run_dir)
    echo(f"run {run_name}: {'continuing ' if continuing else ''}{run_dir}")
    tracker = tracking.PipelineTracker.open(tracking.resolve_tracking_uri(workdir), opts.experiment, run_name,
                                            run_dir)
    echo(f"MLflow: {'continuing ' if tracker.continued else ''}run {tracker.run_id} of experiment "
         f"{opts.experiment!r} in {tracker.uri}")
    tracker.log_params(flatten_params(to_dict(cfg)))
    context = steps.StageContext(cfg=cfg, run_dir=run_dir, tracker=tracker, state=read_state(run_dir),
                                 save_state=functools.partial(write_state, run_dir), echo=echo)
    try:
        steps.pretrain_clip(context, workdir / CACHE_FOLDER)
        steps.connect_ray()
        steps.caches(context, generator)
        warm = steps.warmup(context)
        final = steps.mean_teacher(context, warm["checkpoint"])
        done = report.evaluate(context, final, opts.model_name, opts.visualise)
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    report.closing_lines(context, final, done, time.perf_counter() - started)
    return {"run_dir": str(run_dir), "run_name": run_name, "metrics": final["metrics"], "model": done["model"],
            "mlflow_run_id": tracker.run_id, "tracking_uri": tracker.uri}


def main(argv: list[str] | None = None) -> int:
    opts = parse_options(argv)
    try:
        run_pipeline(opts)
    except DearliError as err:
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0
