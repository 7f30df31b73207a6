"""The report of ``dearli bench ablation``: the rows of the paper's Table 1, the table and the PQ-by-frequency plot.

A *cell* is one row trained and evaluated at one label budget (partition) with one seed; its result is
``{"summary": {"PQ", "SQ", "RQ", "PQ_th", "PQ_st", "mIoU", ...} in %, "per_class_pq": {category id: PQ in %}}``.
The report averages cells over seeds (mean ± sample standard deviation) and groups classes by how often
they occur in the labeled partition (the paper's Fig. 5): the classes of the validation ground truth,
sorted by their number of segments in the labeled images, split into thirds (rare, common, frequent).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRICS = ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "mIoU")
GROUPS = ("rare", "common", "frequent")
# Every row's model evaluated both ways (the cell's "like_for_like"): PQ without and with the ensemble.
BOTH_WAYS = {"PQ_without_ensemble": "without", "PQ_with_ensemble": "with"}


@dataclass(frozen=True)
class Row:
    number: int
    key: str  # folder name of the row's cells
    title: str
    adds: str  # what the row adds over the row above


ROWS = (
    Row(1, "supervised", "M2F-Lang supervised",
        "the baseline: M2F-Lang trained on the labeled partition only, evaluated without the zero-shot ensemble"),
    Row(2, "supervised_ens", "+ ensemble at evaluation",
        "the zero-shot CLIP branch ensembled with the decoder at test time (row 1's checkpoint, no retraining)"),
    Row(3, "mean_teacher", "M2F-Lang + Mean Teacher",
        "the unlabeled images, through Mean Teacher (EMA teacher's pseudo-labels, made without the ensemble), "
        "for the same number of steps"),
    Row(4, "dear", "+ ensemble in the teacher (DEAR)",
        "the teacher's pseudo-labels come from the decoder ensembled with zero-shot CLIP"),
    Row(5, "dearli", "+ DeWa warm-up (DEARLi)",
        "Mean Teacher starts from the decoder warmed up class-agnostically on the SAM masks of every training "
        "image"),
    Row(6, "oracle", "oracle labels (diagnostic)",
        "not a method but the ceiling of row 5: the student's unlabeled branch trains on the ground truth of the "
        "unlabeled images (in the weak view's geometry, through the same strong view and CutMix) instead of the "
        "teacher's pseudo-labels"),
)
ROW_BY_NUMBER = {row.number: row for row in ROWS}


def budget_label(budget: str) -> str:
    """Partition name -> label: ``1_16`` -> ``1/16``."""
    return budget.replace("_", "/")


def mean_spread(values: Iterable[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) of the finite values; NaN without any, spread 0 for one value."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


# --- class-frequency groups -------------------------------------------------------------------------------

def labeled_counts(info: Any, train_split: str, partition: str) -> Counter:
    """Segments per category id (dataset ids) in the labeled images of ``partition``."""
    split = info.split(train_split)
    counts: Counter = Counter()
    for stem in info.partition(partition).labeled:
        counts.update(s.category_id for s in split.record(stem).segments_info)
    return counts


def present_classes(info: Any, val_split: str) -> set[int]:
    """Category ids with at least one segment in the validation ground truth (the classes PQ scores)."""
    return {s.category_id for record in info.split(val_split).records for s in record.segments_info}


def frequency_groups(counts: Counter | dict[int, int], present: Iterable[int]) -> dict[str, list[int]]:
    """Thirds of the ``present`` classes by labeled count (ties by id): {"rare": [...], "common", "frequent"}.

    With n classes the rare and frequent groups get n // 3 each (the common group takes the rest).
    """
    ordered = sorted(present, key=lambda cid: (counts.get(cid, 0), cid))
    third = len(ordered) // 3
    return {"rare": ordered[:third], "common": ordered[third:len(ordered) - third],
            "frequent": ordered[len(ordered) - third:]}


def group_pq(per_class_pq: dict[str, float], classes: list[int]) -> float:
    """Mean PQ (%) of ``classes``; NaN for an empty group."""
    values = [per_class_pq[str(cid)] for cid in classes]
    return statistics.fmean(values) if values else math.nan


# --- summaries ---------------------------------------------------------------------------------------------

def summarise(cells: dict[tuple[str, int, int], dict[str, Any]], budgets: list[str], seeds: list[int],
              rows: list[int], groups: dict[str, dict[str, list[int]]]) -> list[dict[str, Any]]:
    """One entry per (budget, row): mean, spread and per-seed values of every metric and frequency group.

    ``cells``: (budget, seed, row number) -> cell result; ``groups``: budget -> frequency groups.
    """
    entries = []
    for budget in budgets:
        for number in rows:
            found = {seed: cells[(budget, seed, number)] for seed in seeds if (budget, seed, number) in cells}
            entry: dict[str, Any] = {"row": number, "title": ROW_BY_NUMBER[number].title, "budget": budget,
                                     "seeds": sorted(found), "mean": {}, "spread": {}, "per_seed": {}}
            columns = {m: {s: c["summary"][m] for s, c in found.items()} for m in METRICS}
            columns.update({f"PQ_{g}": {s: group_pq(c["per_class_pq"], groups[budget][g]) for s, c in found.items()}
                            for g in GROUPS})
            columns.update({name: {s: c["like_for_like"][way]["PQ"] for s, c in found.items() if "like_for_like" in c}
                            for name, way in BOTH_WAYS.items()})
            for name, by_seed in columns.items():
                entry["mean"][name], entry["spread"][name] = mean_spread(by_seed.values())
                entry["per_seed"][name] = {str(s): v for s, v in by_seed.items()}
            entries.append(entry)
    return entries


def _cell(entry: dict[str, Any], name: str) -> str:
    return _value((entry["mean"][name], entry["spread"][name]), len(entry["seeds"]) > 1)


def _table(entries: list[dict[str, Any]], columns: tuple[str, ...], names: tuple[str, ...]) -> list[str]:
    lines = ["| row | budget | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(columns)]
    for e in entries:
        lines.append(f"| {e['row']}. {e['title']} | {budget_label(e['budget'])} | "
                     + " | ".join(_cell(e, c) for c in columns) + " |")
    return lines


def paired_gain(entry: dict[str, Any], below: dict[str, Any], name: str) -> tuple[float, float]:
    """(mean, spread) over the seeds both entries have of ``entry``'s ``name`` minus ``below``'s, seed by seed."""
    mine, theirs = entry["per_seed"].get(name, {}), below["per_seed"].get(name, {})
    return mean_spread(mine[s] - theirs[s] for s in mine if s in theirs)


def like_for_like_table(entries: list[dict[str, Any]], alpha: float) -> list[str]:
    """Each row's model without and with the ensemble, and its gain over the model of the row listed above it
    at the same budget, seed by seed. Row 2 is row 1's model, so it is not listed."""
    lines = ["| row | budget | PQ without | gain | PQ with ensemble | gain |", "|---|---|---:|---:|---:|---:|"]
    above: dict[str, dict[str, Any]] = {}
    for e in entries:
        if e["row"] == 2 or not math.isfinite(e["mean"].get("PQ_without_ensemble", math.nan)):
            continue
        cells = []
        for name in BOTH_WAYS:
            gain = paired_gain(e, above[e["budget"]], name) if e["budget"] in above else (math.nan, math.nan)
            cells += [_cell(e, name), _value(gain, len(e["seeds"]) > 1, signed=True)]
        lines.append(f"| {e['row']}. {e['title']} | {budget_label(e['budget'])} | " + " | ".join(cells) + " |")
        above[e["budget"]] = e
    if len(lines) == 2:
        return []
    return ["Like for like: every row's model evaluated without the ensemble (α 0) and with it (α = "
            f"{alpha}), and what the row adds to the model above it, seed by seed (mean ± spread of the "
            "differences; row 2 is row 1's model evaluated with the ensemble, so it is not a row here).", "",
            *lines, ""]


def _value(value: tuple[float, float], spread: bool, signed: bool = False) -> str:
    mean, sd = value
    if not math.isfinite(mean):
        return "–"
    text = f"{mean:+.1f}" if signed else f"{mean:.1f}"
    return f"{text} ± {sd:.1f}" if spread else text


def markdown(entries: list[dict[str, Any]], settings: dict[str, Any], groups: dict[str, dict[str, list[int]]],
             names: dict[int, str]) -> str:
    """``ablation.md``: the table, what each row adds, and PQ by class-frequency group."""
    seeds = sorted({s for e in entries for s in e["seeds"]})
    rows = sorted({e["row"] for e in entries})
    lines = [
        "# Ablation on the synthetic world (the paper's Table 1 in miniature)", "",
        f"Preset `{settings['preset']}`; {settings['steps']} training steps for every supervised and Mean-Teacher "
        f"run, {settings['warmup_steps']} DeWa warm-up steps; ensemble weight α = {settings['alpha_clip']} "
        f"(rows 2 and up at evaluation, rows 4 and up in the teacher); seeds {', '.join(map(str, seeds))}: mean "
        "± sample standard deviation over seeds. Mean-Teacher rows report the teacher. PQ, SQ, RQ and mIoU in %.", "",
        *_table(entries, METRICS, METRICS), "",
        *like_for_like_table(entries, settings["alpha_clip"]),
        "What each row adds over the row above:", "",
        *[f"{n}. **{ROW_BY_NUMBER[n].title}**: {ROW_BY_NUMBER[n].adds}." for n in rows], "",
        "PQ by class-frequency group (the paper's Fig. 5): the classes of the validation ground truth sorted "
        "by their number of segments in the labeled partition, in thirds.", "",
        *_table(entries, tuple(f"PQ_{g}" for g in GROUPS), GROUPS), "",
    ]
    for budget, by_group in groups.items():
        listed = "; ".join(f"{g}: {', '.join(names.get(c, str(c)) for c in by_group[g]) or '–'}" for g in GROUPS)
        lines.append(f"- {budget_label(budget)}: {listed}")
    return "\n".join(lines) + "\n"


def plot_frequency(entries: list[dict[str, Any]], path: str | Path) -> Path:
    """``pq_by_frequency.png``: one panel per budget, a group of bars (one per row) per frequency group."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no display backend

    budgets = list(dict.fromkeys(e["budget"] for e in entries))
    rows = sorted({e["row"] for e in entries})
    fig = Figure(figsize=(4.5 * len(budgets), 3.8), layout="constrained")
    axes = fig.subplots(1, len(budgets), sharey=True, squeeze=False)[0]
    width = 0.8 / len(rows)
    for ax, budget in zip(axes, budgets):
        for i, number in enumerate(rows):
            entry = next(e for e in entries if e["budget"] == budget and e["row"] == number)
            means = [entry["mean"][f"PQ_{g}"] for g in GROUPS]
            spreads = [entry["spread"][f"PQ_{g}"] for g in GROUPS]
            xs = [k + (i - (len(rows) - 1) / 2) * width for k in range(len(GROUPS))]
            ax.bar(xs, means, width, yerr=spreads, capsize=2, label=f"{number}. {ROW_BY_NUMBER[number].title}")
        ax.set_xticks(range(len(GROUPS)), GROUPS)
        ax.set_title(f"labeled {budget_label(budget)}")
        ax.set_xlabel("classes by frequency in the labeled partition")
    axes[0].set_ylabel("PQ (%)")
    axes[0].set_ylim(bottom=0)
    axes[-1].legend(fontsize="small", loc="upper left")
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def write_report(out: Path, cells: dict[tuple[str, int, int], dict[str, Any]], info: Any, data: Any,
                 settings: dict[str, Any], budgets: list[str], seeds: list[int], rows: list[int]) -> list[Path]:
    """Write ``ablation.md``, ``ablation.json`` and ``pq_by_frequency.png`` into ``out``; returns their paths.

    ``data``: the config's data section (train and val split names).
    """
    present = present_classes(info, data.val_split)
    counts = {budget: labeled_counts(info, data.train_split, budget) for budget in budgets}
    groups = {budget: frequency_groups(counts[budget], present) for budget in budgets}
    entries = summarise(cells, budgets, seeds, rows, groups)
    names = {c.id: c.name for c in info.categories.categories}
    md, js, png = out / "ablation.md", out / "ablation.json", out / "pq_by_frequency.png"
    md.write_text(markdown(entries, settings, groups, names))
    report = {
        "settings": settings, "budgets": budgets, "seeds": seeds,
        "rows": [dataclasses.asdict(ROW_BY_NUMBER[n]) for n in rows],
        "entries": entries,
        "frequency": {b: {"groups": groups[b], "labeled_segments": {str(c): counts[b].get(c, 0) for c in present}}
                      for b in budgets},
        "compute_seconds": _compute_seconds(out, cells, seeds),
        "cells": [cells[key] for key in sorted(cells)],
    }
    js.write_text(json.dumps(_finite(report), indent=2))
    plot_frequency(entries, png)
    return [md, js, png]


def _compute_seconds(out: Path, cells: dict[tuple[str, int, int], dict[str, Any]], seeds: list[int]) -> float:
    """Training and evaluation time of the reported cells (a model shared by rows counted once), plus warm-ups."""
    trained = {(c["budget"], c["seed"], 1 if c["row"] == 2 else c["row"]): c["train_seconds"] for c in cells.values()}
    records = [out / "warmup" / f"seed_{seed}.json" for seed in seeds]
    warmups = [json.loads(p.read_text())["seconds"] for p in records if p.is_file()]
    return sum(trained.values()) + sum(c["eval_seconds"] for c in cells.values()) + sum(warmups)


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value
