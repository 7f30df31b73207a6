"""``dearli suggest``: the unsure-image signals, and the next partition it writes."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from _faults import Killed, killed_before_rename

from dearli.cli import main
from dearli.data.dataset import load_dataset
from dearli.data.partitions import read_partition_file
from dearli.errors import DataError
from dearli.predict.commands.suggest import write_partition
from dearli.predict.uncertainty import combined_score, js_divergence, query_signals

# conftest's checkpoint fixture, of small_world
CHECKPOINT = {"overrides": ["model.inference.test_short_side=64", "model.ensemble.alpha_clip=0.4"]}


def test_signals_weigh_masks_by_area_and_skip_void_and_empty_queries():
    # 3 classes + void; 3 queries on a 2×4 image: q0 (6 px) decoder and CLIP agree, q1 (2 px) they disagree
    # completely, q2 predicts void (not counted).
    big = 20.0
    dec = torch.tensor([[big, 0, 0, 0], [big, 0, 0, 0], [0, 0, 0, big]])
    clip = torch.tensor([[big, 0, 0], [0, big, 0], [big, 0, 0]])
    ensemble = torch.tensor([[0.9, 0.05, 0.05, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    masks = torch.full((3, 2, 4), -10.0)
    masks[0, :, :3] = 10.0
    masks[1, :, 3] = 10.0
    masks[2] = 10.0
    signals = query_signals(dec, clip, ensemble, masks)
    assert signals["segments"] == 2
    assert signals["disagreement"] == pytest.approx(0.25 * math.log(2), abs=1e-4)  # 2 of 8 px disagree
    assert signals["low_score"] == pytest.approx(1 - (0.75 * 0.9 + 0.25 * 0.5))
    assert combined_score(signals) == pytest.approx(0.5 * (0.25 + signals["low_score"]), abs=1e-4)
    p = torch.tensor([0.2, 0.3, 0.5])
    assert float(js_divergence(p, p)) == pytest.approx(0.0, abs=1e-7)
    nothing = query_signals(dec, clip, ensemble, torch.full((3, 2, 4), -10.0))
    assert nothing == {"disagreement": 0.0, "low_score": 1.0, "segments": 0}


def test_suggest_writes_the_next_partition(small_world, checkpoint, tmp_path, capsys):
    out = tmp_path / "1_4_next"
    args = ["suggest", "--checkpoint", str(checkpoint), "--dataset", str(small_world), "--partition", "1_4",
            "--budget", "2", "--out", str(out)]
    assert main(args) == 0
    info = load_dataset(small_world)
    split, before = info.split("train"), info.partition("1_4")
    with open(out / "suggestions.csv") as fh:
        rows = list(csv.DictReader(fh))
    unlabeled = set(before.unlabeled(split))
    assert {r["stem"] for r in rows} == unlabeled  # every unlabeled image scored, none of the labeled ones
    scores = [float(r["combined"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and [r["rank"] for r in rows] == ["1", "2", "3"]
    after = read_partition_file(out / "labeled.txt")
    assert after.labeled == (*before.labeled, rows[0]["stem"], rows[1]["stem"])  # the most unsure two, appended
    assert after.labeled_split(split).stems == list(after.labeled)  # a partition the training reads
    assert f"labeled.txt with {len(before.labeled) + 2} images" in capsys.readouterr().out
    assert main(args) == 1  # an existing labeled.txt is never replaced
    assert "exists already" in capsys.readouterr().err
    assert main([*args[:-4], "--budget", "0", "--out", str(tmp_path / "x")]) == 1


def test_an_interrupted_publish_leaves_no_partial_partition(small_world, checkpoint, tmp_path):
    """Killed before labeled.txt's rename: no labeled.txt (never a shorter one); the rerun publishes it and
    removes the leftover; an existing labeled.txt is left byte for byte."""
    out = tmp_path / "1_4_next"
    args = ["suggest", "--checkpoint", str(checkpoint), "--dataset", str(small_world), "--partition", "1_4",
            "--budget", "2", "--out", str(out)]
    with killed_before_rename("labeled.txt"), pytest.raises(Killed):
        main(args)
    assert not (out / "labeled.txt").exists() and [p.name for p in out.glob(".labeled.txt.tmp-*")]
    assert main(args) == 0
    published = (out / "labeled.txt").read_bytes()
    assert len(read_partition_file(out / "labeled.txt").labeled) == len(load_dataset(small_world).partition(
        "1_4").labeled) + 2
    assert sorted(p.name for p in out.iterdir()) == ["labeled.txt", "suggestions.csv"]
    info = load_dataset(small_world)
    with pytest.raises(DataError, match="exists already"):
        write_partition(out, info.partition("1_4"), info.split("train"), [], small_world)
    assert (out / "labeled.txt").read_bytes() == published


def _suggest_args(checkpoint, world, out, *extra: str) -> list[str]:
    return ["suggest", "--checkpoint", str(checkpoint), "--dataset", str(world), "--partition", "1_4",
            "--budget", "2", "--out", str(out), *extra]


def test_a_killed_run_resumes_where_it_stopped_and_ranks_as_an_unbroken_one(small_world, checkpoint, tmp_path,
                                                                            monkeypatch, capsys):
    import dearli.predict.uncertainty as uncertainty

    assert main(_suggest_args(checkpoint, small_world, tmp_path / "whole")) == 0
    real, calls = uncertainty.image_signals, []

    def killed_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Killed
        return real(*args, **kwargs)

    out = tmp_path / "resumed"
    monkeypatch.setattr(uncertainty, "image_signals", killed_at_the_second)
    with pytest.raises(Killed):
        main(_suggest_args(checkpoint, small_world, out))
    monkeypatch.setattr(uncertainty, "image_signals", real)
    with open(out / ".suggest-scores.jsonl", "a") as fh:
        fh.write('{"stem": "cut sh')  # a line the kill cut short
    capsys.readouterr()
    assert main(_suggest_args(checkpoint, small_world, out)) == 0
    printed = capsys.readouterr().out
    assert "1 of 3 images scored by an earlier run; scoring the other 2" in printed
    assert (out / "suggestions.csv").read_text() == (tmp_path / "whole" / "suggestions.csv").read_text()
    assert (out / "labeled.txt").read_text() == (tmp_path / "whole" / "labeled.txt").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["labeled.txt", "suggestions.csv"]  # the scores file went


def test_scores_of_another_checkpoint_setting_are_not_reused(small_world, checkpoint, tmp_path, capsys):
    out = tmp_path / "next"
    with killed_before_rename("labeled.txt"), pytest.raises(Killed):
        main(_suggest_args(checkpoint, small_world, out, "--alpha-clip", "0.0"))
    assert len((out / ".suggest-scores.jsonl").read_text().splitlines()) == 4  # settings + 3 images
    capsys.readouterr()
    assert main(_suggest_args(checkpoint, small_world, out)) == 0
    assert "earlier run" not in capsys.readouterr().out  # another CLIP weight: every image scored again
    assert (out / "suggestions.csv").read_text() == _whole_run(checkpoint, small_world, tmp_path)


def _whole_run(checkpoint, world, tmp_path) -> str:
    assert main(_suggest_args(checkpoint, world, tmp_path / "whole")) == 0
    return (tmp_path / "whole" / "suggestions.csv").read_text()


def test_an_unreadable_image_is_reported_and_the_rest_ranked(small_world, checkpoint, tmp_path, capsys):
    import shutil

    world = tmp_path / "world"
    shutil.copytree(small_world, world)
    info = load_dataset(world)
    split = info.split("train")
    bad = sorted(info.partition("1_4").unlabeled(split))[0]
    split.record(bad).image_path.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert main(_suggest_args(checkpoint, world, tmp_path / "next")) == 0
    printed = capsys.readouterr().out
    assert "1 images could not be read and are not ranked" in printed and bad in printed
    with open(tmp_path / "next" / "suggestions.csv") as fh:
        stems = {row["stem"] for row in csv.DictReader(fh)}
    assert bad not in stems and len(stems) == 2
