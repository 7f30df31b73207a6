"""The pipeline's last stage: the evaluation report in MLflow and the closing lines of the log.

The Mean-Teacher stage has already evaluated teacher and student, with and without the zero-shot
ensemble (``<ssl run>/eval/<variant>/step_N/``). This stage logs those numbers (``eval/PQ``,
``eval_student/PQ``, ...), writes the per-class table, draws a few validation images and the loss
curves, and exports the final teacher as a state-dict checkpoint registered as an MLflow model version.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

from dearli.config import DEFAULT_WORKDIR
from dearli.stages import registry, tracking
from dearli.stages.pipeline_steps import StageContext, cost_lines

TEACHER, STUDENT = "teacher", "student"  # ensembled variants; "<variant>_noens" without the ensemble


def eval_dir(ssl_result: dict[str, Any], variant: str) -> Path:
    """Where the Mean-Teacher stage wrote its final evaluation of ``variant``."""
    return Path(ssl_result["run_dir"]) / "eval" / variant / f"step_{int(ssl_result['step']):07d}"


def _read_metrics(folder: Path) -> dict[str, Any] | None:
    import json

    path = folder / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _percent(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def write_per_class_table(categories: Any, ssl_result: dict[str, Any], out: Path) -> Path:
    """CSV, one row per class: PQ/SQ/RQ and IoU (percent) of the teacher, PQ and IoU of the student.

    ``categories``: the dataset's CategoryMap (training order = semantic IoU order).
    """
    variants = {v: _read_metrics(eval_dir(ssl_result, v)) or {} for v in (TEACHER, STUDENT)}
    rows = []
    for index, cat in enumerate(categories.categories):
        row: dict[str, Any] = {"category_id": cat.id, "name": cat.name, "kind": "thing" if cat.isthing else "stuff"}
        for variant, metrics in variants.items():
            pq = metrics.get("pq", {}).get("per_class", {}).get(str(cat.id), {})
            iou = metrics.get("semseg", {}).get("iou", [])
            prefix = "" if variant == TEACHER else f"{variant}_"
            keys = ("pq", "sq", "rq") if variant == TEACHER else ("pq",)
            row.update({f"{prefix}{k.upper()}": _percent(pq.get(k)) for k in keys})
            row[f"{prefix}IoU"] = _percent(iou[index] if index < len(iou) else None)
        rows.append(row)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def export_teacher(checkpoint: str | Path, out_dir: Path) -> Path:
    """The final teacher as a dearli checkpoint without optimiser or student state (a state dict, loadable
    with ``torch.load(weights_only=True)``), plus its ``config.yaml``, in ``out_dir``."""
    import torch

    from dearli.config import save_config
    from dearli.config_io import to_dict
    from dearli.training.checkpoint import load_checkpoint

    target = out_dir / registry.MODEL_FILE
    payload = load_checkpoint(checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not target.is_file():
        slim = {"model": payload["model"], "step": int(payload["step"]), "config": to_dict(payload["config"]),
                "extra": {"source": str(checkpoint), "weights": "teacher"}}
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        torch.save(slim, tmp)
        os.replace(tmp, target)
    save_config(payload["config"], out_dir / "config.yaml")
    return out_dir


def draw(ctx: StageContext, info: Any, ssl_result: dict[str, Any], max_images: int) -> list[Path]:
    """Visualisations of a few validation images (teacher) and the loss curves of both stages."""
    try:
        from dearli.evaluation.visualize import plot_loss_curve, write_visualisations
    except ImportError as err:  # e.g. a plotting library missing: the report goes on without pictures
        ctx.echo(f"evaluate: no visualisations ({err})")
        return []
    made = []
    folder = eval_dir(ssl_result, TEACHER)
    if max_images > 0 and (folder / "panoptic.json").is_file():
        out = ctx.run_dir / "visualisations"
        write_visualisations(info.split(ctx.cfg.data.val_split), folder / "panoptic.json", folder / "panoptic", out,
                             max_images)
        made.append(out)
    for stage in ("warmup", "ssl"):
        jsonl = ctx.run_dir / stage / "metrics.jsonl"
        if jsonl.is_file() and (png := plot_loss_curve(jsonl, ctx.run_dir / f"loss_{stage}.png")) is not None:
            made.append(Path(png))
    return made


def evaluate(ctx: StageContext, ssl_result: dict[str, Any], model_name: str, max_images: int) -> dict[str, Any]:
    """Log the final evaluation, the report artifacts and the registered teacher; returns
    {"model": {"name", "version", "uri", "model_id"}, "per_class": path}."""
    done = ctx.finished("evaluate", "per_class")
    if done is not None:
        ctx.echo(f"evaluate: done before; model {done['model']['uri']}")
        ctx.tracker.reused("evaluate", {})
        return done
    from dearli.data.dataset import load_dataset

    info = load_dataset(ctx.cfg.data.dataset)
    tracker = ctx.tracker
    with tracker.stage("evaluate") as spec, ctx.measured("evaluate"):
        tracker.log_metrics(tracking.eval_metrics(ssl_result["metrics"]), int(ssl_result["step"]), (spec.run_id,))
        table = write_per_class_table(info.categories, ssl_result, ctx.run_dir / "per_class.csv")
        tracker.log_artifact(ctx.run_dir / "config.yaml")
        tracker.log_artifact(table)
        for path in draw(ctx, info, ssl_result, max_images):
            tracker.log_artifact(path, path.name if path.is_dir() else "plots")
        model_dir = export_teacher(ssl_result["checkpoint"], ctx.run_dir / "model")
        model = registry.register_model(tracker, model_dir, model_name, tracker.run_id,
                                        *_version_tags(ctx, ssl_result))
        tracker.set_tags({"dearli.model": model["uri"]})
        ctx.echo(f"evaluate: registered the final teacher as {model['uri']} ({model_dir / registry.MODEL_FILE})")
    result = {"model": model, "per_class": str(table), "model_dir": str(model_dir)}
    ctx.record("evaluate", result)
    return result


def _version_tags(ctx: StageContext, ssl_result: dict[str, Any]) -> tuple[dict[str, str], str | None]:
    """(tags, description) of the registered teacher: its run and PQ; a diagnostic run's (``ssl.oracle_labels``)
    says so in the tag ``dearli.diagnostic`` and the description, and ``dearli serve`` refuses it."""
    pq = ssl_result["metrics"].get(TEACHER, {}).get("PQ")
    tags = {"dearli.run_name": ctx.run_dir.name, **({"PQ": f"{pq:.2f}"} if pq is not None else {})}
    if not ctx.cfg.ssl.oracle_labels:
        return tags, None
    from dearli.stages.mean_teacher import ORACLE_TAG, ORACLE_WARNING

    return {**tags, ORACLE_TAG: ORACLE_WARNING}, (f"{ORACLE_WARNING}. Not a model to use: dearli serve refuses "
                                                  "it (--allow-diagnostic serves it anyway).")


def summary_line(summary: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in summary.items())


def closing_lines(ctx: StageContext, ssl_result: dict[str, Any], report: dict[str, Any], seconds: float) -> None:
    """Final metrics (one line each for teacher and student), where everything is, how to look at it."""
    metrics, echo, tracker = ssl_result["metrics"], ctx.echo, ctx.tracker
    if ctx.cfg.ssl.oracle_labels:
        from dearli.stages.mean_teacher import ORACLE_WARNING

        echo(f"*** {ORACLE_WARNING} ***")
    for variant in (TEACHER, STUDENT):
        if variant in metrics:
            noens = metrics.get(f"{variant}_noens")
            extra = f" (without the ensemble: PQ {noens['PQ']:.2f}, mIoU {noens['mIoU']:.2f})" if noens else ""
            echo(f"final {variant}: {summary_line(metrics[variant])}{extra}")
        else:
            echo(f"final {variant}: NOT EVALUATED (no {eval_dir(ssl_result, variant) / 'metrics.json'}; "
                 f"the Ray Train worker log says why); 'dearli predict --checkpoint "
                 f"{ssl_result['checkpoint']}' scores the model")
    echo(f"run directory: {ctx.run_dir} (config.yaml, per_class.csv, visualisations/, warmup/, ssl/, model/)")
    echo(f"final checkpoint: {ssl_result['checkpoint']}")
    model = report["model"]
    # dearli predict finds the store through MLFLOW_TRACKING_URI, else in the default workdir
    default_store = tracking.local_store_uri(DEFAULT_WORKDIR)
    env = f"MLFLOW_TRACKING_URI={tracker.uri} " if tracker.uri != default_store else ""
    echo(f"registered model: {model['uri']} (e.g. {env}dearli predict --checkpoint {model['uri']} "
         f"--dataset {ctx.cfg.data.dataset} --out PRED_DIR)")
    echo(f"MLflow run: {tracker.run_id} ({ctx.run_dir.name}) in {tracker.uri}")
    echo(f"look at it: {tracker.where()}")
    for line in cost_lines(ctx.state):
        echo(line)
    echo(f"wall time: {seconds / 60:.1f} min")
