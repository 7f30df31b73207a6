"""The paper-scale path as a user runs it offline: real SAM ViT-B and OpenCLIP convnext_base_w_320 loaded from
local weights files (random weights: nothing is downloaded), the ADE20K preset's crop, scales, 200 queries and
9 decoder layers, through ``dearli data prepare-ade20k``, ``jobs/ssl.py`` (caches, DeWa, Mean Teacher with the
teacher pool, evaluation, registry) and ``dearli pseudo-label``; one step of the COCO preset on a COCO panoptic
tree; and the pipeline part of ``dearli bench gpu`` (the same pipeline in a child process, from the inputs the
bench writes itself) at its smallest. Cut down only in steps, batch (1+1), image count and SAM points per side.

Slow (about ten minutes on 2 CPU cores): marked ``paper``, left out of the default run and run by ``.ci/run``
(``pytest -m paper``). The per-stage seconds and peak memory print at the end of the job's log (``-s``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _panoptic_factory import random_image, write_split

from dearli.bench.paper_world import save_random_weights, write_ade20k_partition, write_ade20k_tree
from dearli.cli import main

pytestmark = pytest.mark.paper
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, str]:
    """Random weights of the real models, saved as files the way users keep downloaded checkpoints."""
    return save_random_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def text_cache(tmp_path_factory) -> str:
    """One text-embedding cache for the module, as a user's ~/.cache/dearli/text is: the ADE20K-150 prompts go
    through ConvNeXt-B's text tower once (the bench writes the same seed-0 weights, so the same fingerprint)."""
    return str(tmp_path_factory.mktemp("text"))


def _clean_env(tmp_path: Path, text_cache: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # open_clip and torch hub would write here, never download
    env["DEARLI_TEXT_CACHE"] = text_cache
    return env


@pytest.mark.ray
def test_ade20k_base_pipeline_from_local_weights(weights, text_cache, tmp_path):
    root = write_ade20k_tree(tmp_path / "ADEChallengeData2016", {"train": 4, "val": 2})
    partitions = write_ade20k_partition(tmp_path / "splits", "1_2", ["ADE_train_00000001", "ADE_train_00000003"])
    dataset = tmp_path / "ade20k"
    assert main(["data", "prepare-ade20k", str(root), "--out", str(dataset), "--partitions", str(partitions),
                 "--no-progress"]) == 0
    workdir = tmp_path / "work"
    cut = ["warmup.max_steps=2", "warmup.batch_size=1", "train.max_steps=2", "ssl.labeled_batch_size=1",
           "ssl.unlabeled_batch_size=1", "train.num_workers=1", "train.checkpoint_every=2",
           "cache.points_per_side=2", "cache.pred_iou_thresh=0", "cache.stability_score_thresh=0"]
    job = subprocess.run(
        [sys.executable, "jobs/ssl.py", "--preset", "ade20k-base", "--dataset", str(dataset), "--partition", "1_2",
         "--workdir", str(workdir), "--sam-generator", "sam", "--visualise", "1", "cache.sam_type=vit_b",
         f"cache.sam_checkpoint={weights['sam']}", f"model.backbone.pretrained={weights['clip']}", *cut],
        cwd=REPO, env=_clean_env(tmp_path, text_cache), capture_output=True, text=True, timeout=1800)
    log = job.stdout + job.stderr
    print(job.stdout[-4000:])
    assert job.returncode == 0, log[-8000:]
    run_dir = workdir / "runs" / "ssl_000"
    saved = (run_dir / "config.yaml").read_text()
    # the paper's shapes, untouched by the cuts
    for line in ("crop_size: 640", "num_queries: 200", "num_layers: 9", "clip_model: convnext_base_w_320"):
        assert line in saved, line
    assert "sam cache" in log and "hold no mask" not in log  # thresholds 0: a random SAM still yields masks
    stages = json.loads((run_dir / "stages.json").read_text())
    assert stages["warmup"]["step"] == 2 and stages["ssl"]["step"] == 2
    assert 0 <= stages["ssl"]["metrics"]["teacher"]["PQ"] <= 100
    assert re.search(r"registered the final teacher as models:/dearli/1", log)
    costs = stages["costs"]
    assert set(costs) == {"cache", "warmup", "ssl", "evaluate"}
    assert costs["ssl"]["teacher_peak_mb"] > 500 and costs["warmup"]["worker_peak_mb"] > 500  # a ConvNeXt-B each

    checkpoint = stages["ssl"]["checkpoint"]
    images = root / "images" / "validation"  # the prepared dataset reads the images where ADE20K keeps them
    listing = tmp_path / "two.txt"
    listing.write_text("\n".join(str(p) for p in sorted(images.glob("*.jpg"))[:2]) + "\n")
    labels = subprocess.run(
        [sys.executable, "-m", "dearli.cli", "pseudo-label", "--checkpoint", checkpoint, "--images", str(listing),
         "--out", str(tmp_path / "pl")], cwd=tmp_path, env=_clean_env(tmp_path, text_cache), capture_output=True,
        text=True, timeout=900)
    assert labels.returncode == 0, (labels.stdout + labels.stderr)[-4000:]
    assert len(list((tmp_path / "pl" / "panoptic").glob("*.png"))) == 2
    assert len(json.loads((tmp_path / "pl" / "panoptic.json").read_text())["annotations"]) == 2


COCO_CATS = [{"id": 1, "name": "person", "isthing": 1}, {"id": 3, "name": "car", "isthing": 1},
             {"id": 92, "name": "banner", "isthing": 0}, {"id": 184, "name": "tree-merged", "isthing": 0}]


def test_coco_base_takes_a_step_on_a_coco_panoptic_tree(weights, tmp_path, capsys):
    rng = np.random.default_rng(3)
    root = tmp_path / "coco"
    for split, ids in (("train", (9, 25)), ("val", (139,))):
        images = [random_image(f"{i:012d}", rng, height=96, width=128, image_id=i, categories=COCO_CATS)
                  for i in ids]
        write_split(root, split, images, COCO_CATS, semantic=False)
        (root / "images" / split).rename(root / f"{split}2017")  # the standard COCO layout
        (root / f"annotations/panoptic_{split}.json").rename(root / f"annotations/panoptic_{split}2017.json")
        (root / f"annotations/panoptic_{split}").rename(root / f"panoptic_{split}2017")
    out = tmp_path / "run"
    assert main(["train", "--preset", "coco-base", "--dataset", str(root), "--out", str(out), "train.max_steps=1",
                 "train.batch_size=1", "train.num_workers=1", f"model.backbone.pretrained={weights['clip']}"]) == 0
    printed = capsys.readouterr().out
    assert (out / "checkpoints" / "step_0000001.pt").is_file()
    saved = (out / "config.yaml").read_text()
    assert "crop_size: 512" in saved and "num_queries: 200" in saved
    assert re.search(r"PQ \d+\.\d+", printed)


@pytest.mark.ray  # its pipeline part starts a local Ray instance in a child process
def test_bench_gpu_runs_the_pipeline_part_and_reports_each_stage(text_cache, tmp_path, capsys, monkeypatch):
    # What `dearli bench gpu` adds on a GPU machine, run here on the CPU at its smallest: the ADE20K preset's
    # pipeline in a child process, from random-weight checkpoint files it writes itself.
    monkeypatch.setenv("DEARLI_TEXT_CACHE", text_cache)
    out = tmp_path / "gpu.json"
    code = main(["bench", "gpu", "--device", "cpu", "--sizes", "64", "--batch-size", "1", "--steps", "1",
                 "--warmup", "0", "--sam-type", "tiny", "--sam-images", "1", "--sam-size", "64",
                 "--points-per-side", "2", "--pipeline", "yes", "--pipeline-steps", "1", "--pipeline-images", "2",
                 "--pipeline-batch", "1", "--pipeline-points", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())["pipeline"]
    assert code == 0 and report["ok"], "\n".join(report.get("log_tail", []))
    assert set(report["stages"]) == {"cache", "warmup", "ssl", "evaluate"}
    assert report["stages"]["ssl"]["teacher_peak_mb"] > 500  # a ConvNeXt-B in the teacher actor
    assert re.search(r"Pipeline ade20k-base \(2 training images, 1 DeWa \+ 1 Mean-Teacher steps, batch 1\+1\): "
                     r"\d+ s, done", printed)
    assert re.search(r"cost of ssl: \d+ s; peak memory: driver \d+ MiB, Train worker \d+ MiB, teacher actor", printed)
