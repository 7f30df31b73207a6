"""The stages ``dearli bench scale`` times, each a function ``(world, n) -> figures`` run in a fresh process.

Driver-side stages read and write files in this process; the Ray stages (caches, the warm-up's and the
Mean-Teacher stage's first step, ``dearli pseudo-label``) start a local Ray inside the stage's process, so
every Ray worker is a descendant of it and :class:`DescendantPeak` sees its memory. Stages whose inputs are
not the world itself (a checkpoint, committed pseudo-label parts) get them from a ``prepare`` step run in a
process of its own before the timed one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

STREAM_STEPS = 200
IMAGE_SIZE = (64, 64)
PART_IMAGES = 8  # images per committed part, the caches' and pseudo-label's default
_TINY_MODEL = ["model.inference.test_short_side=64"]


def files_in(folder: Path) -> tuple[int, int]:
    """(files, bytes) under ``folder``; (0, 0) when it does not exist."""
    paths = [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []
    return len(paths), sum(p.stat().st_size for p in paths)


def _cli(args: list[str]) -> int:
    """``dearli ARGS`` in this process with its output hidden; raises when it fails."""
    from dearli.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            code = main(args)
        except SystemExit as exit_:
            code = exit_.code
    if code != 0:
        raise RuntimeError(f"dearli {' '.join(args[:2])} exited {code}: {err.getvalue().strip()[-300:]}")
    return code


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def _output(world: Path, name: str) -> Path:
    return world.parent / f"{world.name}_{name}"


class DescendantPeak:
    """The largest peak resident memory (Linux ``VmHWM``) of any process below this one, sampled in a thread.

    Ray's workers and actors are children of the raylet a local ``ray.init`` starts, so a stage that starts
    its own Ray sees all of them; processes that live shorter than ``interval`` may be missed. 0 where
    ``/proc`` is not there.
    """

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> DescendantPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            self.peak_mib = max(self.peak_mib, self.sample())
            if self._stop.wait(self.interval):
                return

    @staticmethod
    def sample() -> float:
        """MiB: the largest VmHWM among the current descendants of this process."""
        parents: dict[int, int] = {}
        for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    with open(f"/proc/{entry.name}/stat") as fh:
                        parents[int(entry.name)] = int(fh.read().rsplit(")", 1)[1].split()[1])
        mine, frontier = set(), [os.getpid()]
        while frontier:
            pid = frontier.pop()
            children = [p for p, parent in parents.items() if parent == pid and p not in mine]
            mine.update(children)
            frontier.extend(children)
        return max((_hwm_mib(pid) for pid in mine), default=0.0)


def _hwm_mib(pid: int) -> float:
    with contextlib.suppress(OSError, ValueError):
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return 0.0


# ---- driver-side stages ------------------------------------------------------------------------------------

def world_stage(world: Path, n: int) -> dict[str, Any]:
    from dearli.data.synth.writer import write_synth_dataset

    write_synth_dataset(world, num_images=n, seed=0, num_val=10, image_size=IMAGE_SIZE)
    files, size = files_in(world)
    return {"files": files, "bytes": size}


def check_stage(world: Path, n: int) -> dict[str, Any]:
    from dearli.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(["data", "check", str(world), "--split", "train", "--no-progress"])
    return {"exit": code}


def load_stage(world: Path, n: int) -> dict[str, Any]:
    from dearli.data.dataset import load_dataset

    return {"records": len(load_dataset(world).split("train").records)}


def _labeled_and_unlabeled(world: Path) -> tuple[list[str], list[str]]:
    from dearli.config import load_config
    from dearli.data.dataset import load_dataset
    from dearli.training.supervised import labeled_stems

    cfg = load_config("tiny", [f"data.dataset={world}", "data.partition=1_8"])
    info = load_dataset(world)
    labeled = labeled_stems(info, cfg)
    labeled_set = set(labeled)
    return labeled, [stem for stem in info.split(cfg.data.train_split).stems if stem not in labeled_set]


def ssl_split_stage(world: Path, n: int) -> dict[str, Any]:
    labeled, unlabeled = _labeled_and_unlabeled(world)
    return {"labeled": len(labeled), "unlabeled": len(unlabeled)}


def teacher_stream_stage(world: Path, n: int) -> dict[str, Any]:
    from dearli.stages.teacher import PseudoLabelFeed

    _, unlabeled = _labeled_and_unlabeled(world)
    feed = PseudoLabelFeed([], unlabeled, per_step=8, rank=0, world=1, seed=0, prefetch=0, max_staleness=1)
    started = time.perf_counter()
    feed._requests()  # the first step of an epoch also orders the pool: once per epoch, not per step
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(STREAM_STEPS):
        feed._requests()
    return {"first_step_ms": 1000 * first, "ms_per_step": 1000 * (time.perf_counter() - started) / STREAM_STEPS}


def evaluate_stage(world: Path, n: int) -> dict[str, Any]:
    from dearli.evaluation.pq import pq_compute

    json_file, folder = world / "annotations" / "panoptic_train.json", world / "annotations" / "panoptic_train"
    result = pq_compute(json_file, folder, json_file, folder, progress=False)
    return {"pq": round(100 * result["All"]["pq"], 2)}


# ---- pseudo-label outputs without a model ------------------------------------------------------------------

def _gt_rows(world: Path) -> Iterator[dict[str, Any]]:
    """The world's train annotations as ``dearli pseudo-label`` rows (every segment with score 1)."""
    gt = json.loads((world / "annotations" / "panoptic_train.json").read_text())
    names = {c["id"]: (c["name"], bool(c.get("isthing", 0))) for c in gt["categories"]}
    images = {img["id"]: img for img in gt["images"]}
    for ann in gt["annotations"]:
        img = images[ann["image_id"]]
        stem = Path(ann["file_name"]).stem
        segments = [{"id": s["id"], "category_id": s["category_id"], "category_name": names[s["category_id"]][0],
                     "isthing": names[s["category_id"]][1], "score": 1.0, "area": s["area"],
                     "bbox": [float(v) for v in s["bbox"]]} for s in ann["segments_info"]]
        yield {"image_id": str(ann["image_id"]), "stem": stem,
               "image_path": str(world / "images" / "train" / img["file_name"]), "height": img["height"],
               "width": img["width"], "file_name": ann["file_name"], "segments": segments}


def prepare_assemble(world: Path, n: int) -> dict[str, Any]:
    """A pseudo-label output whose parts hold the world's annotations as rows, committed 8 images a part
    under one run's lease, with the annotation PNGs as its panoptic/ files; returns the run id."""
    import pyarrow as pa

    from dearli.caches.store import CacheStore, new_run_id
    from dearli.predict.outputs import KIND, PANOPTIC_DIR, ROW_SCHEMA

    out = _fresh(_output(world, "assemble"))
    store = CacheStore(str(out))
    store.open_for_writing(KIND, {"bench": "scale"})
    run_id = new_run_id()
    store.take_lease(run_id)
    (out / PANOPTIC_DIR).mkdir(parents=True, exist_ok=True)
    batch = []
    for row in _gt_rows(world):
        os.link(world / "annotations" / "panoptic_train" / row["file_name"], out / PANOPTIC_DIR / row["file_name"])
        batch.append(row)
        if len(batch) == PART_IMAGES:
            store.commit(pa.Table.from_pylist(batch, schema=ROW_SCHEMA), run_id)
            batch = []
    if batch:
        store.commit(pa.Table.from_pylist(batch, schema=ROW_SCHEMA), run_id)
    return {"run_id": run_id}


def assemble_stage(world: Path, n: int) -> dict[str, Any]:
    from dearli.caches.store import CacheStore
    from dearli.data.dataset import load_dataset
    from dearli.predict.outputs import assemble

    out = _output(world, "assemble")
    run_id = json.loads((out / "_WRITER").read_text())["run_id"]
    counts = assemble(str(out), load_dataset(world).categories, run_id)
    store = CacheStore(str(out))
    return {"images_out": counts["images"], "segments": counts["segments"], "parts": len(store.part_files()),
            "json_bytes": (out / "panoptic.json").stat().st_size}


# ---- stages with a model or Ray ----------------------------------------------------------------------------

def _checkpoint(world: Path) -> Path:
    return _output(world, "model") / "checkpoints" / "step_0000000.pt"


def prepare_checkpoint(world: Path, n: int) -> dict[str, Any]:
    """An untrained tiny M2F-Lang of the world, saved as a checkpoint (the model stages' input)."""
    import torch

    from dearli.config import load_config
    from dearli.data.dataset import load_dataset
    from dearli.model.m2f_lang import build_m2f_lang
    from dearli.training.checkpoint import save_checkpoint

    if not _checkpoint(world).is_file():
        cfg = load_config("tiny", [f"data.dataset={world}", *_TINY_MODEL])
        torch.manual_seed(0)
        model = build_m2f_lang(cfg.model, load_dataset(world).categories.synonyms)
        save_checkpoint(_output(world, "model"), 0, model, cfg)
    return {}


def _written(out: Path) -> dict[str, Any]:
    files, size = files_in(out)
    return {"files": files, "bytes": size}


def sam_cache_stage(world: Path, n: int) -> dict[str, Any]:
    out = _fresh(_output(world, "sam"))
    _cli(["cache", "sam", "--dataset", str(world), "--split", "train", "--out", str(out),
          "--generator", "felzenszwalb", "--actors", "2"])
    return _written(out)


def clip_cache_stage(world: Path, n: int) -> dict[str, Any]:
    out = _fresh(_output(world, "clip"))
    _cli(["cache", "clip", "--dataset", str(world), "--split", "train", "--out", str(out), "--preset", "tiny",
          "--actors", "2"])
    return _written(out)


def warmup_step_stage(world: Path, n: int) -> dict[str, Any]:
    """The DeWa warm-up (Ray Train, one worker) to its first step and final checkpoint, on the SAM cache of
    every image (``sam-cache`` must have run)."""
    out = _fresh(_output(world, "warmup"))
    _cli(["train", "warmup", "--dataset", str(world), "--sam-cache", str(_output(world, "sam")), "--out", str(out),
          "warmup.max_steps=1", "train.num_workers=1"])
    return {}


def ssl_step_stage(world: Path, n: int) -> dict[str, Any]:
    """The Mean-Teacher stage (Ray Train, one worker, a teacher actor on the whole unlabeled pool) to its
    first step with pseudo-labels, and its final evaluation on the world's 10 validation images."""
    out = _fresh(_output(world, "ssl"))
    _cli(["train", "ssl", "--dataset", str(world), "--partition", "1_8", "--init", str(_checkpoint(world)),
          "--out", str(out), "train.max_steps=1", "train.num_workers=1", "ssl.burn_in_steps=0",
          "ssl.teacher_actors=1", *_TINY_MODEL])
    return {}


def pseudo_label_stage(world: Path, n: int) -> dict[str, Any]:
    out = _fresh(_output(world, "pseudo"))
    _cli(["pseudo-label", "--checkpoint", str(_checkpoint(world)), "--images", str(world / "images" / "train"),
          "--out", str(out)])
    return _written(out)


def suggest_stage(world: Path, n: int) -> dict[str, Any]:
    out = _fresh(_output(world, "suggest"))
    _cli(["suggest", "--checkpoint", str(_checkpoint(world)), "--dataset", str(world), "--partition", "1_8",
          "--budget", "10", "--out", str(out), "--device", "cpu"])
    return _written(out)


Stage = Callable[[Path, int], dict[str, Any]]
STAGE_FUNCTIONS: dict[str, Stage] = {
    "world": world_stage, "check": check_stage, "load": load_stage, "ssl-split": ssl_split_stage,
    "teacher-stream": teacher_stream_stage, "evaluate": evaluate_stage, "assemble": assemble_stage,
    "sam-cache": sam_cache_stage, "clip-cache": clip_cache_stage, "warmup-step": warmup_step_stage,
    "ssl-step": ssl_step_stage, "pseudo-label": pseudo_label_stage, "suggest": suggest_stage}
PREPARE: dict[str, Stage] = {"assemble": prepare_assemble, "ssl-step": prepare_checkpoint,
                             "pseudo-label": prepare_checkpoint, "suggest": prepare_checkpoint}
RAY_STAGES = ("sam-cache", "clip-cache", "warmup-step", "ssl-step", "pseudo-label")
MODEL_STAGES = ("pseudo-label", "suggest")  # a model runs on every image: --model-max caps their sizes
