"""``dearli bench ablation``: the paper's Table 1 in miniature, on the synthetic world.

At each label budget (partition) and seed, five cumulative rows and an oracle (see :data:`ablation_report.ROWS`):

1. M2F-Lang supervised on the labeled images only (``train_supervised``), evaluated with α_clip 0;
2. the same checkpoint evaluated with the preset's zero-shot ensemble (``model.ensemble.alpha_clip``);
3. Mean Teacher (``run_mean_teacher``) from scratch with a teacher that does not ensemble (α 0 in the teacher);
4. Mean Teacher with the preset's ensemble schedule in the teacher (DEAR);
5. row 4 started from a DeWa warm-up checkpoint (DEARLi): one warm-up per seed on the SAM masks of every
   training image, shared by the budgets;
6. the oracle (a diagnostic, not a method): row 5 with the ground truth of the unlabeled images in place of
   the teacher's pseudo-labels (``ssl.oracle_labels``), the ceiling of what the unlabeled branch can learn.

Supervised and Mean-Teacher runs get the same number of steps; rows 2-6 are evaluated with the ensemble,
Mean-Teacher rows by their teacher (the checkpoint's model), as the paper reports.

Everything goes to ``--out`` (default ``<workdir>/bench/ablation_NNN``, a new folder)::

    bench.json                          the settings; rerunning with the same --out requires the same ones
    warmup/seed_<s>/, seed_<s>.json     DeWa of seed s and its record (checkpoint, seconds)
    <budget>/seed_<s>/<row>/train/      the row's training run (row 2 evaluates row 1's checkpoint)
    <budget>/seed_<s>/<row>/eval/       its evaluation; row.json, written last, holds the cell's numbers
    ablation.md, ablation.json, pq_by_frequency.png

A rerun with the same ``--out`` skips every cell that has its row.json and continues an interrupted
training from its last checkpoint. MLflow: one parent run per ``--out`` (experiment ``dearli-bench``) with
a nested run per cell and per warm-up, the report files as the parent's artifacts.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dearli.bench.ablation_report import ROW_BY_NUMBER, Row, budget_label, write_report
from dearli.config import Config
from dearli.config_io import flatten_params
from dearli.errors import ConfigError, DataError

# Default steps: these shares of the preset's train.max_steps and warmup.max_steps. Measured with the synth
# preset on 2 idle cores: a Mean-Teacher row of 600 steps takes about 270 s (start-up included), a
# supervised one 75 s, a 400-step warm-up about 150 s; so 2 budgets x 2 seeds at synth's 750 (a quarter of its
# 3000; 16 Mean-Teacher rows with the oracle, 4 supervised, 2 warm-up runs) come to about 1.7 hours.
STEP_SHARE = 0.25
WARMUP_SHARE = 1.0
DEFAULT_EXPERIMENT = "dearli-bench"
SETTINGS_FILE = "bench.json"
CELL_FILE = "row.json"
# Row 3: the teacher's pseudo-labels without the zero-shot ensemble, whatever the preset's schedule.
TEACHER_WITHOUT_ENSEMBLE = ("model.ensemble.alpha_clip=0", "model.ensemble.alpha_clip_end=0")
ORACLE = ("ssl.oracle_labels=true",)  # row 6: ground truth in place of the teacher's labels
ROW_EXTRA = {3: TEACHER_WITHOUT_ENSEMBLE, 6: ORACLE}
WARM_ROWS = (5, 6)  # rows that start from the seed's DeWa warm-up

echo = functools.partial(print, flush=True)


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    parser = bench_subparsers.add_parser(
        "ablation", help="the paper's Table 1 in miniature: supervised, +ensemble, +Mean Teacher, +DEAR, +DeWa",
        description="Train and evaluate the ablation rows at every budget and seed on the synthetic world; write "
        "ablation.md (mean ± std over seeds), ablation.json and pq_by_frequency.png to --out and log them to "
        "MLflow. Rerunning with the same --out skips the finished cells.")
    parser.add_argument("--budgets", default="1_16,1_4", help="labeled partitions (default: 1_16,1_4)")
    parser.add_argument("--seeds", default="0,1", help="training seeds (default: 0,1)")
    parser.add_argument("--rows", default="1,2,3,4,5,6",
                        help="rows of the table to run (default: all six; 6 is the oracle diagnostic)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder: a new one, or an earlier ablation's to continue it (default: a new "
                        "<workdir>/bench/ablation_NNN)")
    parser.add_argument("--workdir", default=None, metavar="DIR",
                        help="where the synthetic world, caches and the local MLflow store are (default: the "
                        "pipeline's, ~/ray_results/dearli)")
    parser.add_argument("--preset", default="synth", help="config preset (default: synth)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"steps of every supervised and Mean-Teacher run (default: {STEP_SHARE} x the "
                        "preset's train.max_steps)")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help=f"DeWa warm-up steps (default: {WARMUP_SHARE} x the preset's warmup.max_steps)")
    parser.add_argument("--num-images", type=int, default=400, help="synthetic world: training images")
    parser.add_argument("--val-images", type=int, default=100, help="synthetic world: validation images")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help=f"MLflow experiment ({DEFAULT_EXPERIMENT})")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="configuration overrides (every row)")
    parser.set_defaults(handler=run_bench_ablation)


@dataclass
class Bench:
    """What every cell needs: folders, the world, the settings and the MLflow parent run."""

    out: Path
    workdir: Path
    dataset: Path
    info: Any  # DatasetInfo of the world
    settings: dict[str, Any]
    generator: str  # SAM-cache mask generator (felzenszwalb on the synthetic world)
    tracker: Any  # PipelineTracker of the parent run


def _list(text: str, option: str, cast: Callable[[str], Any] = str) -> list[Any]:
    try:
        values = [cast(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option}: expected a comma-separated list, got {text!r}") from None
    if not values:
        raise ConfigError(f"{option}: empty list")
    return list(dict.fromkeys(values))


def base_config(preset: str, overrides: tuple[str, ...], dataset: Path, workdir: Path, budget: str,
                run_name: str) -> tuple[Config, str]:
    """(config, SAM generator) as the pipeline builds it (CLIP resolved, cache locations), at ``budget``."""
    from dearli.pretrain.resolve import CACHE_FOLDER, is_project_clip, pretrain_project_clip
    from dearli.stages.pipeline import PipelineOptions, build_config

    cfg, generator = build_config(PipelineOptions(partition=budget, preset=preset, overrides=overrides), dataset,
                                  workdir, run_name)
    if is_project_clip(cfg.model.backbone.pretrained, workdir / CACHE_FOLDER):
        pretrain_project_clip(workdir / CACHE_FOLDER, echo)  # once; every later cell finds it
    # Same step budget for every row: no per-partition supervised schedule.
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, supervised_steps={})), generator


def cell_config(b: Bench, budget: str, seed: int, extra: tuple[str, ...] = ()) -> Config:
    """The config of one cell: the bench's overrides, then its seed and step budget, then the row's ``extra``."""
    s = b.settings
    overrides = (*s["overrides"], f"train.seed={seed}", f"train.max_steps={s['steps']}",
                 f"warmup.max_steps={s['warmup_steps']}", "train.eval_every=0", *extra)
    cfg = base_config(s["preset"], overrides, b.dataset, b.workdir, budget, b.out.name)[0]
    # The preset's burn-in is a share of its own steps: keep that share of the bench's (shorter) runs.
    preset = base_config(s["preset"], tuple(s["overrides"]), b.dataset, b.workdir, budget, b.out.name)[0]
    burn_in = preset.ssl.burn_in_steps * s["steps"] // preset.train.max_steps
    return dataclasses.replace(cfg, ssl=dataclasses.replace(cfg.ssl, burn_in_steps=burn_in))


def write_json(path: Path, value: Any) -> None:
    """Atomic: an interrupted write leaves no half file that a rerun would take as finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2, default=str))
    os.replace(tmp, path)


def once(marker: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``compute()`` plus its wall time, recorded in ``marker``; the record when it exists."""
    if marker.is_file():
        return json.loads(marker.read_text())
    started = time.perf_counter()
    result = {**compute(), "seconds": time.perf_counter() - started}
    write_json(marker, result)
    return result


def prepare_out(out: str | None, workdir: Path, settings: dict[str, Any]) -> Path:
    """A new output folder, or an earlier ablation's with the same settings (to continue); else refuse."""
    from dearli.stages.workspace import next_run_name

    if out is None:
        folder = workdir / "bench" / next_run_name(workdir / "bench", "ablation", claim=True)
    else:
        folder = Path(out).expanduser().resolve()
        if (folder / SETTINGS_FILE).is_file():
            saved = json.loads((folder / SETTINGS_FILE).read_text())
            differ = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
            if differ:
                raise ConfigError(f"--out: {folder} holds an ablation with other settings ({', '.join(differ)}); "
                                  "rerun it with the same options or choose a new --out")
            echo(f"[ablation] continuing {folder}: finished cells are skipped")
            return folder
        if folder.exists() and any(folder.iterdir()):
            raise DataError(folder, "not empty and not an ablation folder; refusing to write into it")
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / SETTINGS_FILE, settings)
    return folder


def run_bench_ablation(args: argparse.Namespace) -> int:
    from dearli.data.dataset import load_dataset
    from dearli.stages import tracking, workspace

    budgets, seeds = _list(args.budgets, "--budgets"), _list(args.seeds, "--seeds", int)
    rows = _list(args.rows, "--rows", int)
    if not set(rows) <= set(ROW_BY_NUMBER):
        raise ConfigError(f"--rows: rows are numbered 1 to {len(ROW_BY_NUMBER)}, got {args.rows!r}")
    if (args.steps is not None and args.steps < 1) or (args.warmup_steps is not None and args.warmup_steps < 1):
        raise ConfigError("--steps and --warmup-steps must be positive")
    started = time.perf_counter()
    workdir = workspace.resolve_workdir(args.workdir)
    dataset = workspace.synth_dataset(workdir, args.num_images, args.val_images, echo)
    info = load_dataset(dataset)
    for budget in budgets:
        info.partition(budget)  # an unknown partition stops here, naming the dataset
    overrides = tuple(args.overrides)
    cfg, generator = base_config(args.preset, overrides, dataset, workdir, budgets[0], "ablation")
    settings = {"preset": args.preset, "overrides": list(overrides), "num_images": args.num_images,
                "val_images": args.val_images, "alpha_clip": cfg.model.ensemble.alpha_clip,
                "steps": args.steps or max(1, round(STEP_SHARE * cfg.train.max_steps)),
                "warmup_steps": args.warmup_steps or max(1, round(WARMUP_SHARE * cfg.warmup.max_steps))}
    out = prepare_out(args.out, workdir, settings)
    tracker = tracking.PipelineTracker.open(tracking.resolve_tracking_uri(workdir), args.experiment, out.name, out)
    tracker.log_params(flatten_params(settings, "bench."))
    tracker.set_tags({"dearli.budgets": ",".join(budgets), "dearli.seeds": ",".join(map(str, seeds)),
                      "dearli.rows": ",".join(map(str, rows))})
    echo(f"[ablation] {out}: rows {rows} at budgets {budgets}, seeds {seeds}; {settings['steps']} steps, "
         f"{settings['warmup_steps']} warm-up steps; MLflow run {tracker.run_id} in {tracker.uri}")
    bench = Bench(out, workdir, dataset, info, settings, generator, tracker)
    status = "FAILED"  # the parent run's status unless the block completes (or is interrupted)
    try:
        cells = {(budget, seed, n): run_cell(bench, budget, seed, ROW_BY_NUMBER[n])
                 for seed in seeds for budget in budgets for n in rows}
        paths = write_report(out, cells, info, cfg.data, settings, budgets, seeds, rows)
        for path in paths:
            tracker.log_artifact(path)
        tracker.log_metrics(table_metrics(json.loads(paths[1].read_text())["entries"]), step=0)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.finish(status)
    echo(paths[0].read_text())
    echo(f"[ablation] done in {time.perf_counter() - started:.0f} s: {', '.join(str(p) for p in paths)}; "
         f"browse with: {tracker.where()}")
    return 0


def table_metrics(entries: list[dict[str, Any]]) -> dict[str, float]:
    """The table's means as parent-run metrics: ``1_16/row3/PQ``, ``1_16/row3/PQ_rare``, ..."""
    from dearli.stages.tracking import flatten_numbers

    return flatten_numbers({f"{e['budget']}/row{e['row']}": e["mean"] for e in entries})


def run_cell(b: Bench, budget: str, seed: int, row: Row) -> dict[str, Any]:
    """Train (or reuse) and evaluate one row at one budget and seed; its recorded result on a rerun."""
    from dearli.stages.tracking import StepLogger

    cell_dir = b.out / budget / f"seed_{seed}" / row.key
    name = f"{budget_label(budget)} seed {seed} row {row.number} ({row.title})"
    if (cell_dir / CELL_FILE).is_file():
        cell = json.loads((cell_dir / CELL_FILE).read_text())
        if "like_for_like" not in cell:  # recorded before every model was evaluated both ways
            cell["like_for_like"] = like_for_like(b, cell["checkpoint"], cell_dir, cell["alpha_eval"], cell["summary"])
            write_json(cell_dir / CELL_FILE, cell)
        echo(f"[ablation] {name}: done before, skipped")
        return cell
    echo(f"[ablation] {name}")
    with b.tracker.stage(f"{budget}/seed_{seed}/{row.key}") as spec:
        trained = train_row(b, budget, seed, row, spec)
        alpha = 0.0 if row.number == 1 else b.settings["alpha_clip"]
        cell, step = evaluate_cell(b, trained["checkpoint"], cell_dir / "eval", alpha)
        StepLogger(cell_dir / "metrics.jsonl", spec).log(step, cell["summary"], prefix="eval/")
    cell["like_for_like"] = like_for_like(b, trained["checkpoint"], cell_dir, alpha, cell["summary"])
    cell.update(row=row.number, budget=budget, seed=seed, train_seconds=trained["seconds"])
    write_json(cell_dir / CELL_FILE, cell)
    echo(f"[ablation] {name}: PQ {cell['summary']['PQ']:.1f}, mIoU {cell['summary']['mIoU']:.1f} "
         f"(training {trained['seconds']:.0f} s, evaluation {cell['eval_seconds']:.0f} s)")
    return cell


def train_row(b: Bench, budget: str, seed: int, row: Row, spec: Any) -> dict[str, Any]:
    """{"checkpoint", "seconds", ...} of the row's model, trained unless an earlier run recorded it."""
    seed_dir = b.out / budget / f"seed_{seed}"
    if row.number in (1, 2):  # one supervised model for both rows
        run_dir = seed_dir / ROW_BY_NUMBER[1].key / "train"
        return once(run_dir.parent / "train.json", lambda: supervised(cell_config(b, budget, seed), run_dir))
    init = warmup(b, budget, seed)["checkpoint"] if row.number in WARM_ROWS else None
    cfg = cell_config(b, budget, seed, ROW_EXTRA.get(row.number, ()))
    run_dir = seed_dir / row.key / "train"
    return once(run_dir.parent / "train.json", lambda: mean_teacher(cfg, run_dir, init, spec))


def supervised(cfg: Config, run_dir: Path) -> dict[str, Any]:
    from dearli.training.supervised import train_supervised

    result = train_supervised(cfg, run_dir, resume=run_dir.exists(), evaluate=False, echo=echo)
    return {"checkpoint": result["checkpoint"], "run_dir": str(run_dir)}


def mean_teacher(cfg: Config, run_dir: Path, init: str | None, spec: Any) -> dict[str, Any]:
    from dearli.stages.mean_teacher import run_mean_teacher

    result = run_mean_teacher(cfg, run_dir, init=init, resume=run_dir.exists(), echo=echo, tracking=spec,
                              evaluate=False)
    return {"checkpoint": result["checkpoint"], "run_dir": str(run_dir), "init": init}


def warmup(b: Bench, budget: str, seed: int) -> dict[str, Any]:
    """The seed's DeWa checkpoint (every training image, no labels: the same for every budget)."""
    run_dir = b.out / "warmup" / f"seed_{seed}"

    def compute() -> dict[str, Any]:
        from dearli.stages import pipeline_steps
        from dearli.stages.warmup import run_warmup

        cfg = cell_config(b, budget, seed)
        pipeline_steps.connect_ray()
        context = pipeline_steps.StageContext(cfg=cfg, run_dir=b.out, tracker=b.tracker, state={},
                                              save_state=lambda _: None, echo=echo)
        pipeline_steps.caches(context, b.generator)  # the SAM masks of the train split, where missing
        with b.tracker.stage(f"warmup/seed_{seed}") as spec:
            result = run_warmup(cfg, run_dir, cfg.cache.sam_cache, resume=run_dir.exists(), echo=echo,
                                tracking=spec)
        return {"checkpoint": result["checkpoint"], "run_dir": str(run_dir)}

    return once(run_dir.with_suffix(".json"), compute)


def evaluate_cell(b: Bench, checkpoint: str, eval_dir: Path, alpha: float) -> tuple[dict[str, Any], int]:
    """Evaluate the checkpoint's model (an SSL checkpoint's is the teacher) on the val split with ``alpha``
    into ``eval_dir``; returns (the cell's numbers, the checkpoint's step)."""
    from dearli.predict.worker import load_predictor
    from dearli.training.evaluator import evaluate_model

    if eval_dir.exists():  # an evaluation interrupted before its cell was recorded: redo it
        shutil.rmtree(eval_dir)
    started = time.perf_counter()
    model, cfg = load_predictor(checkpoint, b.info.categories)
    metrics = evaluate_model(model, cfg.model, b.info, cfg.data.val_split, eval_dir, alpha_clip=alpha,
                             progress=False, gt_cache_dir=b.out / "gt_cache")
    per_class = {str(cid): 100 * v["pq"] for cid, v in metrics["pq"]["per_class"].items()}
    cell = {"summary": metrics["summary"], "per_class_pq": per_class, "alpha_eval": alpha,
            "checkpoint": str(checkpoint), "eval_seconds": time.perf_counter() - started}
    return cell, cfg.train.max_steps


def like_for_like(b: Bench, checkpoint: str, cell_dir: Path, alpha: float,
                  summary: dict[str, float]) -> dict[str, dict[str, float]]:
    """The cell's model both ways: {"without": its summary at α 0, "with": at the bench's α}. ``summary`` is
    its evaluation at ``alpha``; the other one is made here, into ``eval_alpha_<α>/``."""
    ensemble = b.settings["alpha_clip"]
    other = ensemble if alpha == 0.0 else 0.0
    if other == alpha:  # the bench's α is 0: one evaluation is both
        return {"without": summary, "with": summary}
    second = evaluate_cell(b, checkpoint, cell_dir / f"eval_alpha_{other:g}", other)[0]["summary"]
    both = {alpha: summary, other: second}
    return {"without": both[0.0], "with": both[ensemble]}
