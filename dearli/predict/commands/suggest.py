"""``dearli suggest``: which unlabeled images to label next, written as the next partition's labeled.txt.

Each image's signals are appended to ``OUT/.suggest-scores.jsonl`` as soon as they are known (its first line
names the checkpoint's SHA-256, the CLIP weight and the split): a killed run, rerun with the same arguments,
scores only the images it had not reached. The file goes once labeled.txt is published.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path
from typing import Any

from dearli.predict.uncertainty import SCORES

SCORES_FILE = ".suggest-scores.jsonl"
PROGRESS_STEPS = 10  # a progress line every 10% of the images


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "suggest", help="rank the unlabeled images by how unsure the model is; write the next labeled.txt",
        description="Score every unlabeled image of a partition with a trained checkpoint (the teacher's "
        "test-time path) by how unsure the model is: where the decoder and zero-shot CLIP disagree on a mask's "
        "class (Jensen-Shannon divergence), where the ensemble's best class score is low, or both (combined, "
        "the default). Writes OUT/labeled.txt: the partition's labeled images followed by the --budget most "
        "unsure ones, in the partition format 'dearli train --partition' reads, and OUT/suggestions.csv with "
        "every image's scores, most unsure first. An existing OUT/labeled.txt is never replaced; both files are "
        "published whole (a temporary file, then a rename), labeled.txt last.",
        epilog="example: dearli suggest --checkpoint runs/ssl/checkpoints/step_0002000.pt --dataset runs/synth "
        "--partition 1_8 --budget 20 --out runs/synth/partitions/1_8_next",
    )
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint file or a registered MLflow model (models:/dearli/3)")
    parser.add_argument("--dataset", required=True, help="dataset directory (with dataset.yaml)")
    parser.add_argument("--partition", required=True, help="the current partition: its unlabeled images are ranked")
    parser.add_argument("--split", default="train", help="the split the partition selects from (default: train)")
    parser.add_argument("--budget", type=int, required=True, metavar="N", help="images to add to the labeled list")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder of the new partition (e.g. DATASET/partitions/1_8_next for --partition "
                        "1_8_next later)")
    parser.add_argument("--score", choices=SCORES, default="combined", help="what 'unsure' means (default: combined)")
    parser.add_argument("--alpha-clip", type=float, default=None, metavar="A",
                        help="CLIP weight of the ensemble (default: the checkpoint's)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from dearli.caches.store import remove_temporaries
    from dearli.data.dataset import load_dataset
    from dearli.errors import ConfigError, DataError

    if args.budget < 1:
        raise ConfigError(f"--budget must be positive, got {args.budget}")
    out = Path(args.out)
    _refuse_existing(out)
    if out.is_dir():
        remove_temporaries(out)  # of a killed earlier run
    info = load_dataset(args.dataset)
    partition = info.partition(args.partition)
    split = info.split(args.split)
    unlabeled = partition.unlabeled(split)
    if not unlabeled:
        raise DataError(partition.path, "the partition leaves no unlabeled image to suggest")
    rows = rank_images(args, info, split, unlabeled, out / SCORES_FILE)
    chosen = [row["stem"] for row in rows[: args.budget]]
    _refuse_existing(out)  # another run may have published one while this one ranked
    _write_table(out / "suggestions.csv", rows)
    write_partition(out, partition, split, chosen, Path(args.dataset))
    (out / SCORES_FILE).unlink(missing_ok=True)
    print(f"suggest: {len(chosen)} of {len(unlabeled)} unlabeled images by {args.score} "
          f"(most unsure {rows[0]['stem']}: {rows[0][args.score]:.3f}); labeled.txt with "
          f"{len(partition.labeled) + len(chosen)} images in {out}")
    return 0


def rank_images(args: argparse.Namespace, info: Any, split: Any, stems: tuple[str, ...],
                scores_file: Path | None = None) -> list[dict[str, Any]]:
    """Every stem with its signals, most unsure (by ``args.score``) first; ties in stem order.

    With ``scores_file``, the signals a killed run with the same checkpoint, CLIP weight and split wrote
    there are taken as they are, and every new image's signals are appended to it."""
    from dearli.device import resolve_device
    from dearli.errors import DataError
    from dearli.predict.model_source import checkpoint_digest, checkpoint_file
    from dearli.predict.uncertainty import image_signals
    from dearli.predict.worker import load_predictor

    checkpoint = checkpoint_file(args.checkpoint)
    model, cfg = load_predictor(checkpoint, info.categories, resolve_device(args.device))
    alpha = cfg.model.ensemble.alpha_clip if args.alpha_clip is None else args.alpha_clip
    settings = {"checkpoint_sha256": checkpoint_digest(checkpoint), "alpha_clip": float(alpha), "split": split.name}
    wanted = set(stems)
    done = {s: r for s, r in _read_scores(scores_file, settings).items() if s in wanted} if scores_file else {}
    todo = [stem for stem in stems if stem not in done]
    if done:
        print(f"suggest: {len(done)} of {len(stems)} images scored by an earlier run; scoring the other "
              f"{len(todo)}", flush=True)
    unreadable = []
    with _ScoresWriter(scores_file, settings, list(done.values())) as writer:
        for k, stem in enumerate(todo, start=1):
            try:
                image = split.load_image(split.record(stem))
            except DataError as err:  # a long run records a bad image and goes on; a rerun tries it again
                unreadable.append(str(err))
                continue
            done[stem] = writer.add({"stem": stem, **image_signals(model, image, cfg.model, alpha)})
            if k * PROGRESS_STEPS // len(todo) > (k - 1) * PROGRESS_STEPS // len(todo):
                print(f"suggest: {len(done)}/{len(stems)} images scored", flush=True)
    if unreadable:
        print(f"suggest: {len(unreadable)} images could not be read and are not ranked, e.g. {unreadable[0]}",
              flush=True)
    if not done:
        raise DataError(split.json_path, f"none of the {len(stems)} unlabeled images could be read")
    return sorted((done[stem] for stem in stems if stem in done), key=lambda r: (-r[args.score], r["stem"]))


def _read_scores(path: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The rows of an earlier run's scores file made with ``settings`` (none if it differs or is unreadable).
    A line cut short by a kill ends the rows read."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        if not lines or json.loads(lines[0]) != {"settings": settings}:
            return {}
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    rows: dict[str, dict[str, Any]] = {}
    for line in lines[1:]:
        try:
            row = json.loads(line)
        except ValueError:
            break
        if isinstance(row, dict) and isinstance(row.get("stem"), str):
            rows[row["stem"]] = row
    return rows


class _ScoresWriter:
    """Appends rows to the scores file, one line each, flushed at once; starts the file again (the settings'
    line and the rows kept) so that no line cut short by a kill stays in it. Does nothing without a path."""

    def __init__(self, path: Path | None, settings: dict[str, Any], kept: list[dict[str, Any]]):
        self.path, self.settings, self.kept, self.fh = path, settings, kept, None

    def __enter__(self) -> _ScoresWriter:
        if self.path is not None:
            from dearli.caches.store import write_atomic

            self.path.parent.mkdir(parents=True, exist_ok=True)
            lines = [json.dumps({"settings": self.settings}), *(json.dumps(r) for r in self.kept)]
            write_atomic(self.path, ("\n".join(lines) + "\n").encode())
            self.fh = open(self.path, "a", encoding="utf-8")
        return self

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        if self.fh is not None:
            self.fh.write(json.dumps(row) + "\n")
            self.fh.flush()
        return json.loads(json.dumps(row))  # the row as a rerun reads it back: the same ranking either way

    def __exit__(self, *exc: object) -> None:
        if self.fh is not None:
            self.fh.close()


def write_partition(out: Path, partition: Any, split: Any, chosen: list[str], dataset: Path) -> Path:
    """OUT/labeled.txt: the partition's own lines, then one 'image annotation' line per chosen stem.

    Published whole (temporary file, rename); an existing OUT/labeled.txt is refused, never replaced.
    """
    from dearli.caches.store import write_atomic

    _refuse_existing(out)
    lines = [ln.strip() for ln in partition.path.read_text().splitlines() if ln.strip()] if partition.path else []
    # The mask column names the annotation as the partition's own lines do (only the image names the stem).
    mask_dir = Path(lines[0].split()[1]).parent if lines and len(lines[0].split()) > 1 else Path("annotations")
    root = dataset.resolve()
    for stem in chosen:
        image = Path(split.record(stem).image_path).resolve()
        image = image.relative_to(root) if image.is_relative_to(root) else image
        lines.append(f"{image.as_posix()} {(mask_dir / f'{stem}.png').as_posix()}")
    path = out / "labeled.txt"
    write_atomic(path, ("\n".join(lines) + "\n").encode())
    return path


def _refuse_existing(out: Path) -> None:
    from dearli.errors import DataError

    if (out / "labeled.txt").exists():
        raise DataError(out / "labeled.txt", "exists already; choose a new --out (nothing is replaced)")


def _write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    from dearli.caches.store import write_atomic

    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=["rank", "stem", "combined", "disagreement", "low_score", "segments"])
    writer.writeheader()
    for rank, row in enumerate(rows, start=1):
        writer.writerow({"rank": rank, **{k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()}})
    write_atomic(path, text.getvalue().encode())
