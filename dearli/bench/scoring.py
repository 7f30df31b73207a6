"""``dearli bench test-world``: score saved checkpoints on the reserved test world (one line each).

The world (:data:`dearli.data.synth.worlds.TEST`) is written once under the work directory and reused; each
checkpoint predicts its validation split as ``dearli predict`` does (the checkpoint's own ensemble α unless
``--alpha-clip``) and its PQ, PQ_th, PQ_st and mIoU are printed. Recipe choices are made on the development
worlds (:data:`dearli.data.synth.worlds.WORLDS`); this command is for reporting them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from dearli.data.synth.worlds import TEST, WorldSpec

_COLUMNS = ("PQ", "PQ_th", "PQ_st", "mIoU")


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    parser = bench_subparsers.add_parser(
        "test-world", help="score checkpoints on the reserved test world (no recipe choice reads it)",
        description=f"Write the reserved test world once (seed {TEST.seed}, {TEST.val} validation images) and "
        "score each checkpoint on it: PQ, PQ_th, PQ_st, mIoU, one line each. Choices are made on the development "
        "worlds; this world only reports them.",
        epilog="example: dearli bench test-world --checkpoint runs/ssl/checkpoints/step_0003000.pt "
        "--checkpoint models:/dearli/1",
    )
    parser.add_argument("--checkpoint", action="append", required=True, metavar="CKPT",
                        help="checkpoint file or registered model (models:/dearli/N); repeat for several")
    parser.add_argument("--workdir", default=None, metavar="DIR",
                        help="where the world is kept (default: the jobs' work directory)")
    parser.add_argument("--alpha-clip", type=float, default=None, metavar="A",
                        help="CLIP weight of the ensemble (default: each checkpoint's own)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the scores as JSON")
    parser.set_defaults(handler=_run)


def ensure_world(workdir: Path, spec: WorldSpec = TEST) -> Path:
    """The world of ``spec`` under ``workdir/datasets``: reused when complete, written otherwise."""
    from dearli.data.synth.writer import write_synth_dataset

    root = workdir / "datasets" / spec.folder_name()
    if not (root / "dataset.yaml").is_file():  # written last: a partial world is replaced
        write_synth_dataset(root, spec.train, spec.seed, spec.val, overwrite=root.exists())
    return root


def score(checkpoint: str, world: Path, alpha_clip: float | None = None) -> dict[str, float]:
    """PQ, PQ_th, PQ_st, mIoU (percent) of ``checkpoint`` on the validation split of ``world``."""
    from dearli.data.dataset import load_dataset
    from dearli.device import resolve_device
    from dearli.model.m2f_lang import build_m2f_lang
    from dearli.predict.model_source import checkpoint_file
    from dearli.training.checkpoint import load_checkpoint, restore
    from dearli.training.evaluator import evaluate_model

    device = resolve_device("auto")
    payload = load_checkpoint(checkpoint_file(checkpoint), device)
    info = load_dataset(world)
    model = build_m2f_lang(payload["config"].model, info.categories.synonyms).to(device)
    restore(model, payload)
    with tempfile.TemporaryDirectory(prefix="dearli-test-world-") as out:
        summary = evaluate_model(model, payload["config"].model, info, "val", out, alpha_clip=alpha_clip,
                                 progress=False)["summary"]
    return {k: round(float(summary[k]), 2) for k in _COLUMNS}


def _run(args: argparse.Namespace) -> int:
    from dearli.errors import ConfigError, DataError
    from dearli.stages.workspace import resolve_workdir

    if args.alpha_clip is not None and not 0.0 <= args.alpha_clip <= 1.0:
        raise ConfigError(f"--alpha-clip must lie in [0, 1], got {args.alpha_clip}")
    for checkpoint in args.checkpoint:  # before minutes of writing the world
        if not checkpoint.startswith(("models:/", "runs:/")) and not Path(checkpoint).expanduser().is_file():
            raise DataError(checkpoint, "checkpoint not found (--checkpoint)")
    world = ensure_world(resolve_workdir(args.workdir))
    print(f"test world: seed {TEST.seed}, {TEST.val} validation images ({world})", flush=True)
    rows: list[dict[str, Any]] = []
    for checkpoint in args.checkpoint:
        row = {"checkpoint": checkpoint, **score(checkpoint, world, args.alpha_clip)}
        rows.append(row)
        print(" ".join(f"{k} {row[k]:.2f}" for k in _COLUMNS) + f"  {checkpoint}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"world": TEST.__dict__, "scores": rows}, indent=2))
    return 0
