"""A stage's progress as the driver prints it: rates and ETA logged with each step, and the thread that
follows rank 0's ``metrics.jsonl`` into progress lines.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any


class Progress:
    """Rates of a stage: images/s since its (re)start and the ETA, logged with each step."""

    def __init__(self, total: int, start_step: int, images_per_step: int):
        self.total, self.start_step, self.images_per_step = total, start_step, images_per_step
        self.started = time.perf_counter()

    def rates(self, step: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        done = max(step - self.start_step, 1)
        return {"images_per_s": done * self.images_per_step / elapsed,
                "eta_s": (self.total - step) * elapsed / done, "seconds": elapsed}


def progress_text(stage: str, total: int, record: dict[str, Any]) -> str | None:
    """The log line of one metrics.jsonl record (a training step or an evaluation); None for others."""
    step = record.get("step")
    if record.get("resumed"):
        return f"[{stage}] resumed from checkpoint step {step}"
    if "loss" in record:
        losses = " ".join(f"{k} {v:.3f}" for k, v in record.items() if k.startswith("loss") and isinstance(v, float))
        extra = " ".join(f"{k} {record[k]:.2f}" for k in ("staleness_max", "wait_fraction") if k in record)
        rate = f" {record['images_per_s']:.1f} img/s ETA {_clock(record['eta_s'])}" if "eta_s" in record else ""
        return f"[{stage}] step {step}/{total} {losses}{rate}" + (f" {extra}" if extra else "") + _labels_text(record)
    evals = {k: v for k, v in record.items() if k.startswith("eval")}
    if evals:
        return f"[{stage}] evaluation at step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in evals.items())
    return None


def _labels_text(record: dict[str, Any]) -> str:
    """The pseudo-labels of a Mean-Teacher step beside the ground truth of the same views, where known."""
    if "pl/segments_per_image" not in record:
        return ""
    text = f" | labels {record['pl/segments_per_image']:.1f} segments/image"
    if "gt/segments_per_image" in record:
        text += f" (truth {record['gt/segments_per_image']:.1f})"
    for key, name in (("pl/thing_recall", "things found"), ("pl/thing_precision", "right")):
        if key in record:
            text += f", {name} {100 * record[key]:.0f}%"
    return text


class FollowMetrics:
    """While a stage runs, echo the records rank 0 appends to ``metrics.jsonl`` as progress lines.

    The driver prints them itself, so they reach the driver log (and ``ray job logs``) whatever Ray does
    with worker output.
    """

    def __init__(self, path: Path, stage: str, total: int, echo, interval_s: float = 1.0):
        self.path, self.stage, self.total, self.echo = path, stage, total, echo
        self.offset = path.stat().st_size if path.exists() else 0
        self.interval_s = interval_s
        self.seen = False  # whether a record of this run was echoed yet
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FollowMetrics:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)
        self._poll()

    def _run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            self._poll()

    def _poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path) as fh:
            fh.seek(self.offset)
            text = fh.read()
        complete = text[: text.rfind("\n") + 1]
        self.offset += len(complete.encode())
        for line in complete.splitlines():
            try:
                line_text = progress_text(self.stage, self.total, json.loads(line))
            except ValueError:
                continue
            if line_text:
                # a resume after this driver saw the stage run: Ray Train restarted its workers
                self.echo(line_text + (" after a restart" if self.seen and "resumed from" in line_text else ""))
                self.seen = True


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
