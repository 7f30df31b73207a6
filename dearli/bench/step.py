"""``dearli bench step``: cost of one training step (forward, loss, backward, optimizer) per model preset.

Every preset is built with RANDOM backbone weights (``model.backbone.pretrained=""``): the cost of a step
does not depend on the weights, and nothing is downloaded. The batch is rendered by the synthetic world
at the requested size, in the collate format of :func:`dearli.training.data.collate`. Each preset runs in
its own fresh process, so its peak resident memory is its own and not the maximum over earlier presets.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

# Keep the batch small: the numbers are meant for a CPU, where batch 16 at 512 px would take minutes.
DEFAULT_BATCH_SIZE = 2
DEFAULT_PRESETS = "tiny,base"


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    parser = bench_subparsers.add_parser(
        "step", help="time one training step (forward + backward + optimizer) per model preset",
        description="Build each preset with random backbone weights (no download), run --warmup untimed and "
        "--steps timed training steps (dearli.training.step.train_step) on one synthetic batch, and print "
        "the median and minimum seconds per step, images/s and peak memory.",
    )
    parser.add_argument("--presets", default=DEFAULT_PRESETS,
                        help=f"comma-separated presets (default {DEFAULT_PRESETS}; 'large' works too, slowly)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"images per step (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--size", type=int, default=None,
                        help="square image side, a multiple of 32 (default: the preset's data.crop_size, "
                        "128 for tiny, 512 for base and large)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--amp", action="store_true",
                        help="mixed precision (train.amp=true: bf16 autocast where the GPU has it, else fp16 with "
                        "loss scaling); default fp32. The CPU always runs fp32")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (default 0: torch's own choice, one per core)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model initialisation and the batch")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    jobs = _jobs(args)  # validates everything before any process starts
    print("Random backbone weights (model.backbone.pretrained=\"\"): nothing is downloaded; the step cost does "
          "not depend on the weights.")
    rows = []
    for job in jobs:
        print(f"{job['preset']}: building and timing at {job['size']}×{job['size']}, batch {job['batch_size']} ...",
              flush=True)
        # A fresh process per preset: peak RSS is per process and never goes down.
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            rows.append(pool.submit(bench_preset, job).result())
    print()
    print(format_table(rows))
    return 0


def _jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    from dearli.config import load_config
    from dearli.device import resolve_device
    from dearli.errors import ConfigError

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    if not presets:
        raise ConfigError("--presets: give at least one preset, e.g. tiny,base")
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0 or args.threads < 0:
        raise ConfigError("--batch-size and --steps must be >= 1, --warmup and --threads >= 0")
    if args.size is not None and (args.size < 32 or args.size % 32):
        raise ConfigError(f"--size must be a positive multiple of 32, got {args.size}")
    try:
        device = str(resolve_device(args.device))
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"--device: {err}") from err
    jobs = []
    for preset in presets:
        overrides = step_overrides(device, args.batch_size, args.amp)
        cfg = load_config(preset, overrides)  # unknown preset -> ConfigError here, in the parent
        jobs.append({"preset": preset, "overrides": overrides, "size": args.size or cfg.data.crop_size,
                     "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
                     "seed": args.seed, "threads": args.threads})
    return jobs


def step_overrides(device: str, batch_size: int, amp: bool) -> list[str]:
    """Config overrides of a benchmark step: random backbone weights (no download), device, batch, precision."""
    return ["model.backbone.pretrained=", f"train.device={device}", f"train.batch_size={batch_size}",
            f"train.amp={str(amp).lower()}"]


def precision_name(device: Any, amp: bool) -> str:
    """What :func:`dearli.training.step.autocast_for` runs for ``train.amp=amp`` on ``device``."""
    import torch

    if not amp:
        return "fp32"
    if device.type != "cuda":
        return "fp32 (amp: GPU only)"
    return "amp bf16" if torch.cuda.is_bf16_supported() else "amp fp16"


def synthetic_batch(batch_size: int, size: int | tuple[int, int], seed: int = 0) -> dict[str, Any]:
    """Train samples 0..B-1 of ``SynthWorld(seed)`` rendered at ``size`` (side or (H, W)), collated.

    Crowd segments are left out, as the training dataset does. Returns the format of
    :func:`dearli.training.data.collate`: {"images": B×3×H×W uint8, "valid": B×H×W bool,
    "targets": [{"masks": N×H×W bool, "labels": (N,) int64}], "stems": [str]}.
    """
    import numpy as np
    import torch

    from dearli.data.synth.world import SynthWorld
    from dearli.training.data import collate

    height, width = (size, size) if isinstance(size, int) else size
    world = SynthWorld(seed, (height, width))
    samples = []
    for index in range(batch_size):
        sample = world.sample(index)
        segments = [s for s in sample.segments if not s["iscrowd"]]
        masks = np.stack([sample.segment_map == s["id"] for s in segments]) if segments else \
            np.zeros((0, height, width), dtype=bool)
        samples.append({
            "image": torch.from_numpy(np.ascontiguousarray(sample.image.transpose(2, 0, 1))),
            "valid": torch.ones(height, width, dtype=torch.bool),
            "masks": torch.from_numpy(masks),
            "labels": torch.tensor([s["category_id"] for s in segments], dtype=torch.int64),
            "stem": f"synth_{index:06d}",
        })
    return collate(samples)


@dataclass
class StepParts:
    """What one training step needs besides the batch and the config."""

    model: Any  # dearli.model.m2f_lang.M2FLang
    criterion: Any  # dearli.losses.criterion.SetCriterion
    optimizer: Any  # torch.optim.Optimizer
    device: Any  # torch.device
    build_s: float  # seconds to build model, criterion and optimizer (random init, text embeddings of the classes)


def build_step_parts(cfg: Any, seed: int = 0) -> StepParts:
    """Model (synthetic-world vocabulary), criterion and optimizer of ``cfg``, on ``cfg.train.device``."""
    from dearli.data.synth.classes import CLASSES
    from dearli.device import resolve_device
    from dearli.training.parts import build_training_parts

    t0 = time.perf_counter()
    parts = build_training_parts(cfg, [c.names for c in CLASSES], len(CLASSES), resolve_device(cfg.train.device),
                                 max(1, cfg.train.max_steps), cfg.train.amp, seed=seed)
    return StepParts(parts.model, parts.criterion, parts.optimizer, parts.device, time.perf_counter() - t0)


def time_steps(parts: StepParts, batch: dict[str, Any], cfg: Any, warmup: int,
               steps: int) -> tuple[list[float], list[float]]:
    """``warmup`` untimed then ``steps`` timed calls of ``train_step`` on one batch, with ``cfg.train.amp``.

    Returns (seconds of each timed step, loss of every step). On CUDA each step ends with a synchronize, so
    its time is the GPU's and not only the launch of its kernels.
    """
    import torch

    from dearli.training.step import make_grad_scaler, train_step

    scaler = make_grad_scaler(parts.device, cfg.train.amp)
    seconds, losses = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        logged = train_step(parts.model, parts.criterion, parts.optimizer, batch, cfg, scaler, parts.device)
        if parts.device.type == "cuda":
            torch.cuda.synchronize(parts.device)
        if i >= warmup:
            seconds.append(time.perf_counter() - t0)
        losses.append(logged["loss"])
    return seconds, losses


def bench_preset(job: dict[str, Any]) -> dict[str, Any]:
    """Build the preset and time ``job["steps"]`` training steps after ``job["warmup"]``; returns one row."""
    import torch

    from dearli.config import load_config

    cfg = load_config(job["preset"], job["overrides"])
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    parts = build_step_parts(cfg, job["seed"])
    device = parts.device
    batch = synthetic_batch(job["batch_size"], job["size"], job["seed"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, losses = time_steps(parts, batch, cfg, job["warmup"], job["steps"])
    median = statistics.median(seconds)
    return {
        "preset": job["preset"], "backbone": cfg.model.backbone.clip_model, "device": str(device),
        "precision": precision_name(device, cfg.train.amp),
        "threads": torch.get_num_threads(), "size": job["size"], "batch": job["batch_size"],
        "steps": job["steps"], "median_s": median, "min_s": min(seconds), "max_s": max(seconds),
        "images_per_s": job["batch_size"] / median,
        "peak_rss_mb": peak_rss_mb(),
        "cuda_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        **parameter_counts(parts.model),
        "build_s": parts.build_s, "first_loss": losses[0], "last_loss": losses[-1],
    }


def parameter_counts(model: Any) -> dict[str, float]:
    """Trainable and frozen parameters in millions: {"trainable_m", "frozen_m"}."""
    params = list(model.parameters())
    return {"trainable_m": sum(p.numel() for p in params if p.requires_grad) / 1e6,
            "frozen_m": sum(p.numel() for p in params if not p.requires_grad) / 1e6}


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def format_table(rows: list[dict[str, Any]]) -> str:
    """The result rows as an aligned text table, with a note line per preset."""
    header = ("preset", "backbone", "device", "precision", "size", "batch", "median s/step", "min s/step", "max s/step",
              "images/s", "peak RSS MiB", "peak CUDA MiB", "trainable M", "frozen M")
    lines = [header]
    for r in rows:
        cuda = "-" if r["cuda_peak_mb"] is None else f"{r['cuda_peak_mb']:.0f}"
        lines.append((r["preset"], r["backbone"], r["device"], r["precision"], f"{r['size']}×{r['size']}",
                      str(r["batch"]), f"{r['median_s']:.3f}", f"{r['min_s']:.3f}", f"{r['max_s']:.3f}",
                      f"{r['images_per_s']:.2f}",
                      f"{r['peak_rss_mb']:.0f}", cuda, f"{r['trainable_m']:.2f}", f"{r['frozen_m']:.1f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.rjust(w) if i >= 4 else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
            for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    for r in rows:
        text.append(f"{r['preset']}: {r['steps']} timed steps, {r['threads']} torch threads, built in "
                    f"{r['build_s']:.1f} s, loss {r['first_loss']:.2f} -> {r['last_loss']:.2f} "
                    "(random backbone weights)")
    return "\n".join(text)
