"""``dearli bench scale``: the stages' figures and the growth verdict (the sizes themselves are for the bench)."""

import json
import subprocess
import sys

from dearli.bench.scale import growth, run_stage
from dearli.bench.scale_stages import PREPARE


def test_growth_flags_a_stage_whose_cost_per_image_grows():
    rows = [{"stage": "load", "images": 1000, "s_per_1k": 0.10}, {"stage": "load", "images": 10000, "s_per_1k": 0.12},
            {"stage": "check", "images": 1000, "s_per_1k": 1.0}, {"stage": "check", "images": 10000, "s_per_1k": 9.0},
            {"stage": "teacher-stream", "images": 1000, "ms_per_step": 0.01},
            {"stage": "teacher-stream", "images": 10000, "ms_per_step": 0.5}]
    verdicts = growth(rows)
    assert verdicts["load"].startswith("flat per image")
    assert verdicts["check"].startswith("worse (9.00x")
    assert verdicts["teacher-stream"].startswith("worse (50.00x per step")


def test_stages_report_their_figures_on_a_small_world(tmp_path):
    world = tmp_path / "world"
    row = run_stage("world", str(world), 24)
    assert row["images"] == 24 and row["files"] > 3 * 24 and row["bytes"] > 0 and row["peak_mib"] > 0
    assert run_stage("load", str(world), 24)["records"] == 24
    start = run_stage("ssl-split", str(world), 24)
    assert start["labeled"] + start["unlabeled"] == 24 and start["labeled"] == 3
    assert run_stage("teacher-stream", str(world), 24)["ms_per_step"] > 0
    assert run_stage("check", str(world), 24)["exit"] == 0


def test_assemble_stage_assembles_every_committed_image(tmp_path):
    world = tmp_path / "world"
    run_stage("world", str(world), 20)
    prepared = PREPARE["assemble"](world, 20)
    row = run_stage("assemble", str(world), 20)
    assert prepared["run_id"] and row["images_out"] == 20 and row["parts"] == 3  # 8 + 8 + 4 images
    gt = json.loads((world / "annotations" / "panoptic_train.json").read_text())
    out = json.loads((tmp_path / "world_assemble" / "panoptic.json").read_text())
    assert row["segments"] == sum(len(a["segments_info"]) for a in gt["annotations"])
    assert sorted(a["file_name"] for a in out["annotations"]) == sorted(a["file_name"] for a in gt["annotations"])


_PEAK_OF_A_CHILD = """
import subprocess, sys
from dearli.bench.scale_stages import DescendantPeak
child = "b = bytearray({mib} * 2**20); import time; time.sleep(1.0)"
with DescendantPeak(interval=0.05) as peak:
    if {mib}:
        subprocess.run([sys.executable, "-c", child], check=True)
print(peak.peak_mib)
"""


def _peak_seen(mib: int) -> float:
    """DescendantPeak in a new process (no other children) around a child holding ``mib`` MiB, or none."""
    out = subprocess.run([sys.executable, "-c", _PEAK_OF_A_CHILD.format(mib=mib)], check=True, capture_output=True,
                         text=True)
    return float(out.stdout.strip().splitlines()[-1])


def test_descendant_peak_sees_a_child_process_memory():
    assert _peak_seen(200) >= 200
    assert _peak_seen(0) == 0


def test_bad_sizes_and_stages_are_one_line_errors(capsys):
    from dearli.cli import main

    assert main(["bench", "scale", "--sizes", "5"]) != 0
    assert "--sizes must list image counts of at least 16, got '5'" in capsys.readouterr().err
    assert main(["bench", "scale", "--stages", "world,foo"]) != 0
    assert "--stages: unknown foo (known: world" in capsys.readouterr().err
