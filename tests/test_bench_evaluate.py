"""``dearli bench evaluate``: runs with or without hotcoco, prints min/median/max and the median ratios."""

from __future__ import annotations

import re
import sys

import pytest

from dearli.cli import main

SMALL = ["bench", "evaluate", "--num-images", "3", "--height", "24", "--width", "32", "--workers", "1",
         "--repeat", "2"]


def table(out: str) -> dict:
    """Evaluator name -> (min, median, max) seconds from the printed table."""
    rows = re.findall(r"^(dearli \(cold\)|dearli \(warm GT cache\)|panopticapi|hotcoco)\s+([\d.]+)\s+([\d.]+)\s+"
                      r"([\d.]+)\s+[\d.]+", out, flags=re.MULTILINE)
    return {name: tuple(map(float, t)) for name, *t in rows}


def test_bench_evaluate_without_hotcoco(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "hotcoco", None)  # import hotcoco fails as when it is not installed
    monkeypatch.setitem(sys.modules, "hotcoco.panoptic", None)
    assert main(SMALL) == 0
    out = capsys.readouterr().out
    assert "hotcoco: not installed" in out
    rows = table(out)
    assert set(rows) == {"dearli (cold)", "dearli (warm GT cache)"}
    assert all(lo <= mid <= hi for lo, mid, hi in rows.values())
    assert "2 timed rounds after 1 untimed warm-up round" in out
    assert "ratio hotcoco" not in out


def test_bench_evaluate_with_hotcoco_prints_median_ratios(capsys):
    pytest.importorskip("hotcoco.panoptic")
    assert main([*SMALL, "--no-warm"]) == 0
    out = capsys.readouterr().out
    rows = table(out)
    assert set(rows) == {"dearli (cold)", "hotcoco"}
    # hotcoco agrees with dearli on the synthetic set
    diff = re.search(r"^hotcoco\s.*\s([\d.]+e[-+]\d+)$", out, flags=re.MULTILINE)
    assert diff and float(diff.group(1)) <= 1e-9
    ratio = re.search(r"^ratio hotcoco / dearli \(cold\) .*: ([\d.]+)$", out, flags=re.MULTILINE)
    assert ratio and float(ratio.group(1)) > 0
