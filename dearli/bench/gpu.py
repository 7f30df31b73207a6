"""``dearli bench gpu``: the paper-scale costs on one GPU, in one command.

Three parts, all with RANDOM weights (nothing is downloaded; the cost of the arithmetic does not depend on the
weights):

* one training step of a preset (default ``base``: OpenCLIP convnext_base_w_320, 200 queries, 9 decoder
  layers) at each ``--sizes`` crop, in fp32 and in mixed precision, with :mod:`dearli.bench.step`'s
  machinery (:func:`dearli.training.step.train_step` on a synthetic batch);
* SAM's image encoder alone and its whole automatic mask generator, loaded from a checkpoint file by the
  code ``dearli cache sam --sam-checkpoint FILE`` uses (:func:`dearli.caches.generators.build_generator`);
* on CUDA (``--pipeline``), the whole pipeline with the ADE20K preset in a child process
  (:mod:`dearli.bench.gpu_pipeline`).

The first two run in this process: peak memory is ``torch.cuda.max_memory_allocated`` reset before each row
(on a CPU run, the process's peak resident memory, which never goes down). This process imports neither Ray
nor MLflow: a bare GPU machine with torch, timm, open_clip and segment_anything runs the first two parts
(``--pipeline no``); the pipeline's child process needs the whole install.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from dearli.bench import gpu_pipeline
from dearli.caches.generators import SAM_TYPES
from dearli.config import CacheConfig

_CACHE = CacheConfig()

NO_CUDA = ("dearli bench gpu: no CUDA device (torch.cuda.is_available() is False); run it on a machine with a "
           "GPU, or give --device cpu with small --sizes, --batch-size, --sam-images and --sam-size")
# Published figures of comparable models, printed beside ours (other models and GPUs: orders of magnitude only).
REFERENCES = (
    {"what": "Mask2Former Swin-B at 640", "figure": "5.8 GB training memory per GPU"},
    {"what": "SAM ViT-H image encoder", "figure": "about 0.15 s per image on an A100"},
)


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    parser = bench_subparsers.add_parser(
        "gpu", help="paper-scale costs on one GPU: training step of the base model, SAM automatic masks",
        description="Time one training step of --preset (random backbone weights) at each of --sizes, batch "
        "--batch-size, in fp32 and mixed precision; then SAM's image encoder and automatic mask generator "
        "(random weights saved to a temporary checkpoint and loaded as `dearli cache sam` loads one). Prints "
        "seconds, images/s and peak GPU memory per row, with published reference figures; on CUDA, then the "
        "whole pipeline with the ADE20K preset (see --pipeline), per stage seconds and peak memory; a few "
        "minutes on one large GPU. Without a GPU it exits with status 2, unless --device cpu (then use small "
        "sizes).",
    )
    parser.add_argument("--device", default="cuda",
                        help="cuda (default), cuda:N, or cpu for a check run of the same code at toy sizes")
    parser.add_argument("--preset", default="base", help="model preset of the training rows (default base)")
    parser.add_argument("--sizes", "--size", default="640,512",
                        help="comma-separated square crop sides, multiples of 32 (default 640,512: the ADE20K "
                        "and COCO crops)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per training step (default 8)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per row (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps first (default 3)")
    parser.add_argument("--sam-type", choices=SAM_TYPES, default="vit_b",
                        help="segment_anything model (default vit_b; tiny: the project's toy SAM)")
    parser.add_argument("--sam-images", type=int, default=4,
                        help="timed SAM images, after one untimed (default 4)")
    parser.add_argument("--sam-size", type=int, default=640,
                        help="side of the synthetic images given to SAM, which resizes them to its input side "
                        "(1024 for vit_b/l/h) as in `dearli cache sam` (default 640)")
    parser.add_argument("--points-per-side", type=int, default=_CACHE.points_per_side, metavar="N",
                        help=f"SAM's point-prompt grid is N×N (default {_CACHE.points_per_side}, as the cache's)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op CPU threads (default 0: torch's own choice, one per core)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and the images")
    parser.add_argument("--out", default=None, metavar="FILE", help="also write the figures to FILE as JSON")
    gpu_pipeline.add_arguments(parser)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="configuration overrides of the preset (device, batch and precision are the bench's)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    sizes = _validate(args)
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"dearli bench gpu on {device_name(device)}, torch {torch.__version__}: random weights everywhere "
          "(nothing is downloaded; the cost does not depend on the weights).", flush=True)
    report = {"device": str(device), "device_name": device_name(device), "torch": torch.__version__,
              "float32_matmul_precision": torch.get_float32_matmul_precision(), "memory": memory_kind(device),
              "train_steps": bench_train_steps(args, sizes, device)}
    release_memory(device)  # the SAM rows' peaks must not include the training model
    report["sam"] = bench_sam(args, device)
    if gpu_pipeline.wanted(args, device):
        release_memory(device)  # the pipeline's processes need the GPU to themselves
        report["pipeline"] = gpu_pipeline.bench_pipeline(args, device)
    report["references"] = [dict(r) for r in REFERENCES]
    report["notes"] = notes(report)
    print()
    print(format_report(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"figures written to {args.out}")
    return 0 if report.get("pipeline", {}).get("ok", True) else 1


def _validate(args: argparse.Namespace) -> list[int]:
    """The crop sides of ``--sizes``; a ConfigError for any option out of range, before anything is built."""
    from dearli.data.synth.world import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE
    from dearli.errors import ConfigError

    try:
        sizes = [int(v) for v in args.sizes.split(",") if v.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(s < 32 or s % 32 for s in sizes):
        raise ConfigError(f"--sizes: give positive multiples of 32 (e.g. 640,512), got {args.sizes!r}")
    counts = (args.batch_size, args.steps, args.sam_images, args.points_per_side)
    if min(counts) < 1 or min(args.warmup, args.threads) < 0:
        raise ConfigError("--batch-size, --steps, --sam-images and --points-per-side must be >= 1, --warmup and "
                          "--threads >= 0")
    gpu_pipeline.validate(args)
    if not MIN_IMAGE_SIDE <= args.sam_size <= MAX_IMAGE_SIDE:
        raise ConfigError(f"--sam-size: must lie in [{MIN_IMAGE_SIDE}, {MAX_IMAGE_SIDE}], got {args.sam_size}")
    return sizes


def _device(name: str) -> Any:
    from dearli.device import resolve_device
    from dearli.errors import ConfigError

    try:
        return resolve_device(name)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"--device: {err}") from err


def device_name(device: Any) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def memory_kind(device: Any) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated, reset before each row (weights and optimizer state included)"
    return "peak resident memory of the process (CPU run: never reset, so each row shows the maximum so far)"


def reset_peak(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: Any) -> float:
    """Peak memory since the last :func:`reset_peak`, in GiB (see :func:`memory_kind`)."""
    import torch

    from dearli.bench.step import peak_rss_mb

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_mb() / 2**10


def synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: Any) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_train_steps(args: argparse.Namespace, sizes: list[int], device: Any) -> list[dict[str, Any]]:
    """One row per (crop side, precision): the preset is built once, and every row reuses it."""
    from dearli.bench import step
    from dearli.config import load_config

    # The bench's own settings come last, so a KEY=VALUE cannot change what a row claims to measure.
    cfgs = {amp: load_config(args.preset, [*args.overrides, *step.step_overrides(str(device), args.batch_size, amp)])
            for amp in (False, True)}
    print(f"{args.preset}: building {cfgs[False].model.backbone.clip_model} with random weights ...", flush=True)
    parts = step.build_step_parts(cfgs[False], args.seed)
    rows = []
    for size in sizes:
        batch = step.synthetic_batch(args.batch_size, size, args.seed)
        for amp in (False, True):
            precision = step.precision_name(device, amp)
            print(f"  training step {size}×{size}, batch {args.batch_size}, {precision}: {args.warmup} + "
                  f"{args.steps} steps ...", flush=True)
            reset_peak(device)
            seconds, losses = step.time_steps(parts, batch, cfgs[amp], args.warmup, args.steps)
            median = statistics.median(seconds)
            rows.append({"part": "train step", "preset": args.preset,
                         "backbone": cfgs[amp].model.backbone.clip_model, "size": size, "batch": args.batch_size,
                         "precision": precision, "steps": args.steps, "median_s": median, "min_s": min(seconds),
                         "images_per_s": args.batch_size / median, "peak_memory_gib": peak_gib(device),
                         "first_loss": losses[0], "last_loss": losses[-1], "build_s": parts.build_s,
                         **step.parameter_counts(parts.model)})
    return rows


def sam_images(count: int, side: int, seed: int) -> list[Any]:
    """``count`` synthetic-world images (train stream), each side×side×3 uint8 RGB."""
    from dearli.data.synth.world import SynthWorld

    world = SynthWorld(seed, (side, side))
    return [world.sample(i).image for i in range(count)]


def write_random_sam_checkpoint(sam_type: str, path: Path, seed: int) -> Path:
    """A randomly initialised (seeded) SAM of ``sam_type`` saved as a state dict, as the released files are."""
    import torch

    if sam_type == "tiny":
        from dearli.caches.tiny_sam import build_tiny_sam

        model = build_tiny_sam(seed=seed)
    else:
        from segment_anything import sam_model_registry

        torch.manual_seed(seed)
        model = sam_model_registry[sam_type]()  # no checkpoint: random initialisation
    torch.save(model.state_dict(), path)
    return path


def load_sam_generator(sam_type: str, points_per_side: int, seed: int, device: Any) -> Any:
    """The cache's generator (the project's defaults but the point grid) on random weights from a file."""
    import tempfile

    from dearli.caches.generators import GeneratorSpec, build_generator

    with tempfile.TemporaryDirectory(prefix="dearli-bench-gpu-") as tmp:
        checkpoint = write_random_sam_checkpoint(sam_type, Path(tmp) / f"sam_{sam_type}_random.pth", seed)
        release_memory(device)
        return build_generator(GeneratorSpec(kind="sam", sam_type=sam_type, sam_checkpoint=str(checkpoint),
                                             points_per_side=points_per_side, device=str(device)))


def encoder_input(predictor: Any, image: Any) -> Any:
    """1×3×S×S float on the model's device: ``image`` (H×W×3 uint8) as ``SamPredictor.set_image`` feeds the
    image encoder (longest side resized to S, normalised, zero-padded to S×S)."""
    import torch

    resized = predictor.transform.apply_image(image)
    pixels = torch.as_tensor(resized, device=predictor.device).permute(2, 0, 1).contiguous()[None]
    return predictor.model.preprocess(pixels)


def time_calls(call: Any, items: list[Any], device: Any) -> list[float]:
    """Seconds of ``call(item)`` for every item but the first, which warms up (kernels, caches, allocator)."""
    import torch

    seconds = []
    with torch.inference_mode():
        for i, item in enumerate(items):
            synchronize(device)
            t0 = time.perf_counter()
            call(item)
            synchronize(device)
            if i:
                seconds.append(time.perf_counter() - t0)
    return seconds


def bench_sam(args: argparse.Namespace, device: Any) -> list[dict[str, Any]]:
    """Two rows: SAM's image encoder alone, and the whole automatic mask generator, per image."""
    print(f"SAM {args.sam_type}: random weights -> checkpoint file -> the cache's loader ...", flush=True)
    generator = load_sam_generator(args.sam_type, args.points_per_side, args.seed, device)
    predictor = generator.predictor
    side = predictor.model.image_encoder.img_size
    images = sam_images(args.sam_images + 1, args.sam_size, args.seed)
    common = {"sam_type": args.sam_type, "images": args.sam_images, "precision": "fp32"}

    print(f"  image encoder, {side}×{side} input: 1 + {args.sam_images} images ...", flush=True)
    inputs = [encoder_input(predictor, image) for image in images]
    reset_peak(device)
    seconds = time_calls(predictor.model.image_encoder, inputs, device)
    encoder = {"part": "sam image encoder", "input": f"{side}×{side}", **common,
               **_per_image(seconds), "peak_memory_gib": peak_gib(device)}
    del inputs

    spec = generator.spec
    print(f"  automatic masks, {args.sam_size}×{args.sam_size} images, {spec.points_per_side}² points: "
          f"1 + {args.sam_images} images ...", flush=True)
    counts: list[int] = []
    reset_peak(device)
    seconds = time_calls(lambda image: counts.append(len(generator.generate(image))), images, device)
    masks = {"part": "sam automatic masks", "input": f"{args.sam_size}×{args.sam_size}", **common,
             **_per_image(seconds), "peak_memory_gib": peak_gib(device),
             "points_per_side": spec.points_per_side, "points_per_batch": spec.points_per_batch,
             "pred_iou_thresh": spec.pred_iou_thresh, "stability_score_thresh": spec.stability_score_thresh,
             "masks_per_image": statistics.mean(counts[1:])}
    return [encoder, masks]


def _per_image(seconds: list[float]) -> dict[str, float]:
    median = statistics.median(seconds)
    return {"median_s": median, "min_s": min(seconds), "images_per_s": 1.0 / median}


def notes(report: dict[str, Any]) -> list[str]:
    """What the figures are, in sentences: memory measure, random-weight caveat, our figures beside theirs."""
    encoder, masks = report["sam"]
    lines = [f"Memory: {report['memory']}.",
             "median s: per training step (the whole batch) in the train rows, per image in the SAM rows.",
             f"SAM {masks['sam_type']} with random weights kept {masks['masks_per_image']:.1f} masks per image after "
             f"the quality thresholds (predicted IoU {masks['pred_iou_thresh']}, stability "
             f"{masks['stability_score_thresh']}): a real checkpoint keeps many more. The encoder and mask-decoder "
             "timings are real; the per-mask post-processing of kept masks (RLE, NMS) is mostly missing."]
    # Beside the published training memory at 640: ours at the first crop side (640 by default).
    train = [r for r in report["train_steps"] if r["size"] == report["train_steps"][0]["size"]]
    ours = ", ".join(f"{r['precision']} {r['peak_memory_gib']:.2f} GiB" for r in train)
    first = train[0]
    lines.append(f"Ours at {first['size']}: {first['preset']} ({first['backbone']}, frozen), batch {first['batch']} "
                 f"on one device: {ours}.")
    lines.append(f"Ours: SAM {encoder['sam_type']} image encoder {encoder['median_s']:.3f} s per image on "
                 f"{report['device_name']}.")
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The rows as one aligned table, then the notes and the published reference figures as a footer."""
    header = ("part", "model", "input", "batch", "precision", "median s", "images/s", "peak GiB")
    lines = [header]
    for r in report["train_steps"]:
        lines.append((r["part"], f"{r['preset']} ({r['backbone']})", f"{r['size']}×{r['size']}", str(r["batch"]),
                      r["precision"], f"{r['median_s']:.3f}", f"{r['images_per_s']:.2f}",
                      f"{r['peak_memory_gib']:.2f}"))
    for r in report["sam"]:
        lines.append((r["part"], f"SAM {r['sam_type']}", r["input"], "1", r["precision"], f"{r['median_s']:.3f}",
                      f"{r['images_per_s']:.2f}", f"{r['peak_memory_gib']:.2f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.rjust(w) if i >= 5 else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
            for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    if "pipeline" in report:
        text += ["", *gpu_pipeline.report_lines(report["pipeline"])]
    text += ["", *report["notes"], "Published reference figures (other models and GPUs):"]
    text += [f"  {r['what']}: {r['figure']}" for r in report["references"]]
    return "\n".join(text)
