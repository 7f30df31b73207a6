"""``dearli bench ablation``: class-frequency groups and the seed summary, and the supervised rows at toy size."""

import json
import math

import pytest

from dearli.bench.ablation_report import frequency_groups, like_for_like_table, markdown, mean_spread, summarise
from dearli.cli import main

SUMMARY = {"PQ": 0.0, "SQ": 0.0, "RQ": 0.0, "PQ_th": 0.0, "PQ_st": 0.0, "mIoU": 0.0}


def test_frequency_groups_are_thirds_by_labeled_count():
    counts = {0: 9, 1: 0, 2: 4, 3: 4, 4: 1, 5: 30, 6: 2, 7: 50}
    present = [0, 1, 2, 3, 4, 5, 6]  # class 7 is absent from the validation ground truth: no PQ, no group
    groups = frequency_groups(counts, present)
    assert groups == {"rare": [1, 4], "common": [6, 2, 3], "frequent": [0, 5]}


def test_summary_averages_seeds_and_groups():
    groups = {"1_4": {"rare": [1], "common": [2], "frequent": [3, 4]}}
    cells = {("1_4", seed, 1): {"summary": {**SUMMARY, "PQ": pq}, "per_class_pq": {"1": pq, "2": 0.0, "3": 10.0,
                                                                                  "4": 20.0 + seed}}
             for seed, pq in ((0, 20.0), (1, 30.0))}
    [entry] = summarise(cells, ["1_4"], [0, 1], [1], groups)
    assert entry["seeds"] == [0, 1]
    assert entry["mean"]["PQ"] == 25.0 and entry["spread"]["PQ"] == pytest.approx(math.sqrt(50))
    assert entry["mean"]["PQ_rare"] == 25.0 and entry["mean"]["PQ_frequent"] == pytest.approx(15.25)
    assert mean_spread([3.0]) == (3.0, 0.0)
    text = markdown([entry], {"preset": "tiny", "steps": 5, "warmup_steps": 1, "alpha_clip": 0.4}, groups,
                    {1: "red circle"})
    assert "| 1. M2F-Lang supervised | 1/4 | 25.0 ± 7.1 |" in text
    assert "rare: red circle" in text


def test_the_like_for_like_table_gives_each_rows_gain_seed_by_seed():
    groups = {"1_4": {"rare": [], "common": [], "frequent": []}}

    def cell(pq, without, with_):
        return {"summary": {**SUMMARY, "PQ": pq}, "per_class_pq": {},
                "like_for_like": {"without": {"PQ": without}, "with": {"PQ": with_}}}

    cells = {("1_4", 0, 1): cell(20.0, 20.0, 23.0), ("1_4", 1, 1): cell(22.0, 22.0, 24.0),
             ("1_4", 0, 2): cell(23.0, 20.0, 23.0), ("1_4", 1, 2): cell(24.0, 22.0, 24.0),
             ("1_4", 0, 3): cell(26.0, 21.0, 26.0), ("1_4", 1, 3): cell(27.0, 25.0, 27.0)}
    entries = summarise(cells, ["1_4"], [0, 1], [1, 2, 3], groups)
    assert entries[2]["mean"]["PQ_without_ensemble"] == 23.0 and entries[2]["mean"]["PQ_with_ensemble"] == 26.5
    lines = like_for_like_table(entries, 0.6)
    assert "α = 0.6" in lines[0] and not any(line.startswith("| 2.") for line in lines)
    assert "| 1. M2F-Lang supervised | 1/4 | 21.0 ± 1.4 | – | 23.5 ± 0.7 | – |" in lines
    # row 3 over row 1, seed by seed: without +1 and +3 (mean +2.0, spread 1.4), with +3 and +3
    assert "| 3. M2F-Lang + Mean Teacher | 1/4 | 23.0 ± 2.8 | +2.0 ± 1.4 | 26.5 ± 0.7 | +3.0 ± 0.0 |" in lines
    assert like_for_like_table(summarise({("1_4", 0, 1): {"summary": SUMMARY, "per_class_pq": {}}}, ["1_4"], [0],
                                         [1], groups), 0.6) == []  # cells recorded before: no table


def test_supervised_rows_at_toy_size_and_rerun_skips_them(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the local sqlite store in the workdir
    out = tmp_path / "out"
    argv = ["bench", "ablation", "--workdir", str(tmp_path / "wd"), "--out", str(out), "--preset", "tiny",
            "--budgets", "1_4", "--seeds", "0", "--rows", "1,2", "--steps", "2", "--num-images", "16",
            "--val-images", "4", "model.loss.num_points=256", "data.crop_size=64",
            "model.inference.test_short_side=64", "train.batch_size=2", "model.ensemble.alpha_clip=0.4"]
    assert main(argv) == 0
    report = json.loads((out / "ablation.json").read_text())
    assert [(e["row"], e["budget"], e["seeds"]) for e in report["entries"]] == [(1, "1_4", [0]), (2, "1_4", [0])]
    for entry in report["entries"]:
        for name in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "mIoU"):
            assert 0.0 <= entry["mean"][name] <= 100.0
    cells = {c["row"]: c for c in report["cells"]}
    assert (cells[1]["alpha_eval"], cells[2]["alpha_eval"]) == (0.0, 0.4)
    assert cells[1]["checkpoint"] == cells[2]["checkpoint"]  # row 2 evaluates row 1's model
    # like for like: each model both ways, the second evaluation in a folder of its own
    assert cells[1]["like_for_like"] == cells[2]["like_for_like"] == {"without": cells[1]["summary"],
                                                                       "with": cells[2]["summary"]}
    assert (out / "1_4" / "seed_0" / "supervised" / "eval_alpha_0.4").is_dir()
    assert (out / "1_4" / "seed_0" / "supervised_ens" / "eval_alpha_0").is_dir()
    groups = report["frequency"]["1_4"]["groups"]
    assert sum(len(g) for g in groups.values()) == len(report["frequency"]["1_4"]["labeled_segments"]) >= 3
    table = (out / "ablation.md").read_text()
    assert "| 1. M2F-Lang supervised | 1/4 |" in table and "| 2. + ensemble at evaluation | 1/4 |" in table
    assert "Like for like" in table
    assert (out / "pq_by_frequency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    recorded = (out / "1_4" / "seed_0" / "supervised" / "row.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.count("done before, skipped") == 2
    assert (out / "1_4" / "seed_0" / "supervised" / "row.json").stat().st_mtime_ns == recorded

    # a cell recorded before the second evaluation existed gets it on the next run, without retraining
    row2 = out / "1_4" / "seed_0" / "supervised_ens" / "row.json"
    old = json.loads(row2.read_text())
    row2.write_text(json.dumps({k: v for k, v in old.items() if k != "like_for_like"}))
    assert main(argv) == 0
    assert json.loads(row2.read_text())["like_for_like"] == old["like_for_like"]
    assert json.loads(row2.read_text())["train_seconds"] == old["train_seconds"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'wd' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("dearli-bench").experiment_id])
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(runs) == 3  # one parent (continued by the reruns), one nested run per row
    assert sorted(a.path for a in client.list_artifacts(parent.info.run_id)) == [
        "ablation.json", "ablation.md", "pq_by_frequency.png"]
    assert parent.data.metrics["1_4/row2/PQ"] == pytest.approx(report["entries"][1]["mean"]["PQ"])
