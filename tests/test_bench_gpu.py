"""``dearli bench gpu``: its refusal without CUDA, a tiny CPU run of the same code, and its imports.

The CPU runs use the tiny preset, a 32-px crop and the project's tiny SAM on a 4×4 point grid, with one torch
thread (on a busy 2-core machine, more threads spin against each other and a tiny step takes seconds).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from dearli.bench.gpu import NO_CUDA, REFERENCES
from dearli.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["bench", "gpu", "--device", "cpu", "--preset", "tiny", "--sizes", "32", "--batch-size", "1", "--steps", "1",
        "--warmup", "0", "--sam-type", "tiny", "--sam-images", "1", "--sam-size", "32", "--points-per-side", "4",
        "--threads", "1"]
NUMBERS = ("median_s", "min_s", "images_per_s", "peak_memory_gib")
# What the GPU machine lacks: the bench gpu path must run without them.
ABSENT = ("ray", "mlflow", "pycocotools")


def test_without_cuda_it_exits_2_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine that has a GPU
    assert main(["bench", "gpu"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == NO_CUDA + "\n"
    assert NO_CUDA.startswith("dearli bench gpu: no CUDA device (torch.cuda.is_available() is False); ")


def test_defaults_are_the_paper_scale():
    args = build_parser().parse_args(["bench", "gpu"])
    assert (args.device, args.preset, args.sizes, args.batch_size, args.sam_type, args.sam_images) == (
        "cuda", "base", "640,512", 8, "vit_b", 4)
    assert args.points_per_side == 32 and args.out is None


def test_cpu_run_prints_every_row_and_writes_the_json(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    threads = torch.get_num_threads()
    try:
        assert main([*TINY, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert {"device", "device_name", "torch", "memory", "train_steps", "sam", "references", "notes"} <= set(report)
    assert report["device"] == "cpu"
    steps = report["train_steps"]
    assert [(r["size"], r["batch"], r["precision"]) for r in steps] == [
        (32, 1, "fp32"), (32, 1, "fp32 (amp: GPU only)")]  # autocast is GPU-only: the row says what ran
    assert [r["part"] for r in report["sam"]] == ["sam image encoder", "sam automatic masks"]
    assert report["sam"][0]["input"] == "64×64" and report["sam"][1]["points_per_side"] == 4
    for row in steps + report["sam"]:
        assert all(row[key] > 0 for key in NUMBERS), row
        cells = (row["precision"], f"{row['median_s']:.3f}", f"{row['images_per_s']:.2f}")
        assert any(line.startswith(row["part"]) and all(c in line for c in cells) for line in printed.splitlines())
    assert report["sam"][1]["masks_per_image"] >= 0
    assert report["references"] == [dict(r) for r in REFERENCES]
    for ref in REFERENCES:
        assert f"{ref['what']}: {ref['figure']}" in printed
    assert "random weights kept" in printed and "masks per image" in printed


def test_the_gpu_path_imports_neither_ray_nor_mlflow():
    # A fresh interpreter in which importing any of ABSENT fails, as on the GPU machine, runs the whole command.
    code = (f"import sys\nfor name in {ABSENT!r}:\n    sys.modules[name] = None\n"
            "from dearli.cli import main\n"
            f"rc = main({TINY!r})\n"
            f"assert not [n for n in sys.modules if n.split('.')[0] in {ABSENT!r} and sys.modules[n] is not None]\n"
            "sys.exit(rc)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sam automatic masks" in result.stdout


def test_bench_step_has_the_amp_switch_the_gpu_rows_use():
    from dearli.bench.step import _jobs, precision_name

    [fp32] = _jobs(build_parser().parse_args(["bench", "step", "--presets", "tiny"]))
    [amp] = _jobs(build_parser().parse_args(["bench", "step", "--presets", "tiny", "--amp"]))
    assert "train.amp=false" in fp32["overrides"] and "train.amp=true" in amp["overrides"]
    assert precision_name(torch.device("cpu"), False) == "fp32"
    assert precision_name(torch.device("cpu"), True) == "fp32 (amp: GPU only)"  # autocast_for is GPU-only
