"""The paper-scale pipeline part of ``dearli bench gpu``: ``jobs/ssl.py``'s pipeline with the ADE20K preset
(real SAM ViT-B and ConvNeXt-B CLIP from random-weight checkpoint files, the paper's crop, queries and layers),
cut down only in steps, batch and image count, on the machine's GPU.

It runs the pipeline in a child process (as ``jobs/ssl.py`` would), on a fresh local Ray instance and a
temporary work directory, so this process imports neither Ray nor MLflow and the user's cluster and tracking
server are left alone. What each stage cost comes from the run's ``stages.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PRESET = "ade20k-base"
PARTITION = "1_2"
IMAGE_SIZE = (480, 640)  # (H, W): an ADE20K-like photo; the preset resizes and crops it to 640
VAL_IMAGES = 2
# The child's log lines kept in the report when it fails.
LOG_TAIL_LINES = 40
RUNNER = "import sys; from dearli.stages.pipeline import main; sys.exit(main(sys.argv[1:]))"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", choices=("auto", "yes", "no"), default="auto",
                        help=f"also run the whole pipeline with the {PRESET} preset (caches, DeWa, Mean Teacher with "
                        "the teacher actor, evaluation) on random-weight SAM ViT-B and ConvNeXt-B checkpoints; "
                        "auto (default): on CUDA only")
    parser.add_argument("--pipeline-steps", type=int, default=10,
                        help="DeWa and Mean-Teacher steps of the pipeline part (default 10 each)")
    parser.add_argument("--pipeline-images", type=int, default=8,
                        help=f"training images of the pipeline part, half labeled (default 8; {VAL_IMAGES} val)")
    parser.add_argument("--pipeline-batch", type=int, default=2,
                        help="images per step of the warm-up, and labeled + unlabeled per Mean-Teacher step "
                        "(default 2, so 2+2)")
    parser.add_argument("--pipeline-points", type=int, default=8, metavar="N",
                        help="SAM's point grid of the pipeline's cache, N×N (default 8: random weights keep few "
                        "masks, and the cache's cost is the SAM rows' business)")


def wanted(args: argparse.Namespace, device: Any) -> bool:
    return args.pipeline == "yes" or (args.pipeline == "auto" and device.type == "cuda")


def job_arguments(args: argparse.Namespace, dataset: Path, workdir: Path, weights: dict[str, str]) -> list[str]:
    """The pipeline's command line: the preset's shapes untouched, only steps, batch and the SAM grid cut."""
    steps, batch = args.pipeline_steps, args.pipeline_batch
    return ["--preset", PRESET, "--dataset", str(dataset), "--partition", PARTITION, "--workdir", str(workdir),
            "--sam-generator", "sam", "--visualise", "0", "cache.sam_type=vit_b",
            f"cache.sam_checkpoint={weights['sam']}", f"model.backbone.pretrained={weights['clip']}",
            f"warmup.max_steps={steps}", f"warmup.batch_size={batch}", f"train.max_steps={steps}",
            f"ssl.labeled_batch_size={batch}", f"ssl.unlabeled_batch_size={batch}", "ssl.burn_in_steps=0",
            "train.num_workers=1", f"train.checkpoint_every={steps}", f"cache.points_per_side={args.pipeline_points}",
            # a random SAM passes no quality threshold: with them at 0 its masks still reach the warm-up
            "cache.pred_iou_thresh=0", "cache.stability_score_thresh=0"]


def child_env(device: Any, home: Path) -> dict[str, str]:
    """The user's environment without their Ray address and tracking server; the bench's device only."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["XDG_CACHE_HOME"] = str(home / "cache")  # open_clip and torch hub would write here, never download
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif device.index is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(device.index)
    return env


def validate(args: argparse.Namespace) -> None:
    """A ConfigError for a pipeline option out of range, before anything is built."""
    from dearli.errors import ConfigError

    if min(args.pipeline_steps, args.pipeline_batch, args.pipeline_points) < 1 or args.pipeline_images < 2:
        raise ConfigError("--pipeline-steps, --pipeline-batch and --pipeline-points must be >= 1, "
                          "--pipeline-images >= 2 (half of them are labeled)")


def bench_pipeline(args: argparse.Namespace, device: Any) -> dict[str, Any]:
    """Build the inputs, run the pipeline, and return its per-stage seconds and peak memory (``stages.json``'s
    costs) with the wall time; ``ok`` False (and the log's tail) when the pipeline failed."""
    from dearli.bench.paper_world import save_random_weights, write_ade20k_partition, write_ade20k_tree
    from dearli.data.prepare_ade20k import prepare_ade20k

    with tempfile.TemporaryDirectory(prefix="dearli-bench-pipeline-") as tmp:
        root = Path(tmp)
        print(f"pipeline {PRESET}: {args.pipeline_images} + {VAL_IMAGES} rooms of {IMAGE_SIZE[1]}×{IMAGE_SIZE[0]}, "
              "random SAM vit_b and CLIP checkpoints ...", flush=True)
        tree = write_ade20k_tree(root / "ADEChallengeData2016", {"train": args.pipeline_images, "val": VAL_IMAGES},
                                 IMAGE_SIZE, args.seed)
        stems = [f"ADE_train_{i + 1:08d}" for i in range(0, args.pipeline_images, 2)]
        partitions = write_ade20k_partition(root / "splits", PARTITION, stems)
        dataset = prepare_ade20k(tree, root / "ade20k", partitions=partitions, progress=False)
        weights = save_random_weights(root / "weights", args.seed)
        workdir = root / "work"
        print(f"  jobs/ssl.py's pipeline: {args.pipeline_steps} DeWa + {args.pipeline_steps} Mean-Teacher steps "
              f"of {args.pipeline_batch}+{args.pipeline_batch} images ...", flush=True)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", RUNNER, *job_arguments(args, dataset, workdir, weights)],
                              env=child_env(device, root), cwd=root, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        report = {"preset": PRESET, "images": args.pipeline_images, "steps": args.pipeline_steps,
                  "batch": args.pipeline_batch, "seconds": seconds, "ok": done.returncode == 0}
        stages = workdir / "runs" / "ssl_000" / "stages.json"
        if stages.is_file():
            report["stages"] = json.loads(stages.read_text()).get("costs", {})
        if not report["ok"]:
            report["log_tail"] = (done.stdout + done.stderr).splitlines()[-LOG_TAIL_LINES:]
        return report


def report_lines(report: dict[str, Any]) -> list[str]:
    """The pipeline part, for the bench's printout: its settings, wall time and one cost line per stage."""
    from dearli.stages.pipeline_steps import COSTS, cost_lines

    head = (f"Pipeline {report['preset']} ({report['images']} training images, {report['steps']} DeWa + "
            f"{report['steps']} Mean-Teacher steps, batch {report['batch']}+{report['batch']}): "
            f"{report['seconds']:.0f} s, {'done' if report['ok'] else 'FAILED'}")
    lines = [head, *(f"  {line}" for line in cost_lines({COSTS: report.get("stages", {})}))]
    if not report["ok"]:
        lines += ["  the pipeline's last log lines:", *(f"    {line}" for line in report.get("log_tail", []))]
    return lines
