"""``dearli bench scale``: the stages' figures and the growth verdict (the sizes themselves are for the bench)."""

from dearli.bench.scale import growth, run_stage


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
    start = run_stage("ssl-start", str(world), 24)
    assert start["labeled"] + start["unlabeled"] == 24 and start["labeled"] == 3
    assert run_stage("teacher-stream", str(world), 24)["ms_per_step"] > 0
    assert run_stage("check", str(world), 24)["exit"] == 0
