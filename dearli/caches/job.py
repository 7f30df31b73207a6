"""Run a cache job on Ray Data: image list -> actor pool of workers -> committed Parquet parts.

The driver lists the images still missing from the cache (resume), Ray Data streams them through an
actor pool (one model per actor, GPUs when the cluster has them), every batch is committed by the
actor that computed it, and the driver gathers the per-image status rows into a summary and, at the end,
merges the small parts into few large ones (``CacheStore.compact``). A batch that
could not be written (disk full, read-only) or whose run was superseded stops the job with that error;
what was committed stays, and a rerun does the rest.

Actors are created with ``max_restarts=0``: Ray Data always hands its actors their constructor
arguments through the object store, and Ray cannot promise to restart such actors (it logs an error
line for each one). Recovery happens one level up instead: when an actor dies, the driver starts a new
pool for the images that are still missing (``max_attempts``), as a rerun of the command would.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dearli.caches.store import CacheStore, StaleWriterError, new_run_id
from dearli.caches.workers import STATUS_DONE, STATUS_FAILED, STATUS_STALE, STATUS_UNWRITABLE
from dearli.errors import OutputError
from dearli.runtime import default_gpus_per_actor, ensure_ray

MAX_ATTEMPTS = 3  # pools in a row that may lose actors before committing anything (then the job fails)
RETRY_WAIT_S = 10.0  # before a pool that follows one lost without progress (doubling): Ray's node health
# checks notice a lost node in ~15-30 s by default, and a pool started sooner may be placed on it again
PROGRESS_STEPS = 10  # progress lines per run (every 10% of the images)
MAX_BLOCKS = 200  # Ray Data blocks a job splits its images into, at most (see input_blocks)
BLOCKS_PER_ACTOR = 4  # ... but at least this many an actor, so that no actor waits on another's last block



@dataclass
class JobSummary:
    total: int = 0  # images in the list
    done: int = 0  # processed and committed by this run
    skipped: int = 0  # already in the cache before this run
    failed: int = 0  # recorded in the errors table by this run
    retried: int = 0  # images that had failed in an earlier run and were attempted again
    remaining: int = 0  # still missing after this run because of --limit
    failures: list[tuple[str, str]] = field(default_factory=list)  # (stem, reason)
    nodes: dict[str, int] = field(default_factory=dict)  # Ray node id -> images its actors processed
    run_id: str = ""  # the run's writer lease (see dearli.caches.store)

    def line(self, uri: str) -> str:
        text = (f"{uri}: {self.total} images: {self.done} done, {self.skipped} skipped (already cached), "
                f"{self.failed} failed")
        if self.retried:
            text += f" ({self.retried} retried from earlier runs)"
        if self.remaining:
            text += f", {self.remaining} left for a later run (--limit)"
        if len(self.nodes) > 1:
            text += f"; actors on {len(self.nodes)} nodes"
        return text


class _Progress:
    """Counts the per-image statuses into a summary and prints a line every 10% of the images."""

    def __init__(self, kind: str, summary: JobSummary, total: int, echo: Callable[[str], None] | None):
        self.kind, self.summary, self.total, self.echo = kind, summary, total, echo
        self.seen: set[str] = set()
        self._next = 1

    def add(self, stem: str, status: str, reason: str = "", node_id: str = "") -> None:
        """Count one image's status; a status that stops the job raises its error (the reason is its message)."""
        if status == STATUS_STALE:
            raise StaleWriterError(reason)
        if status == STATUS_UNWRITABLE:
            raise OutputError(None, reason)
        self.seen.add(stem)
        if node_id:
            self.summary.nodes[node_id] = self.summary.nodes.get(node_id, 0) + 1
        if status == STATUS_DONE:
            self.summary.done += 1
        elif status == STATUS_FAILED:
            self.summary.failed += 1
            self.summary.failures.append((stem, reason))
        if self.echo and len(self.seen) * PROGRESS_STEPS >= self._next * self.total:
            self._next = len(self.seen) * PROGRESS_STEPS // self.total + 1
            self.echo(f"{self.kind}: {len(self.seen)}/{self.total} images ({self.summary.failed} failed)")


def _on_ray(worker_cls: type) -> type:
    """``worker_cls`` whose status rows also name the Ray node that ran them (column ``node_id``)."""
    import numpy as np
    import ray

    class NodeRecordingWorker(worker_cls):
        def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
            out = worker_cls.__call__(self, batch)
            out["node_id"] = np.full(len(out["stem"]), ray.get_runtime_context().get_node_id(), dtype=object)
            return out

    NodeRecordingWorker.__name__ = NodeRecordingWorker.__qualname__ = worker_cls.__name__  # Ray Data's actor name
    return NodeRecordingWorker


def input_blocks(images: int, images_per_part: int, actors: int) -> int:
    """How many Ray Data blocks ``images`` rows go in: one per part while there are at most MAX_BLOCKS parts,
    else MAX_BLOCKS (at least BLOCKS_PER_ACTOR a actor). Ray Data keeps the metadata of every block in the
    driver, so a block per 8-image part made the driver grow with the dataset; an actor still commits a
    part per ``images_per_part`` images of a block."""
    parts = math.ceil(images / images_per_part)
    return max(1, min(parts, max(MAX_BLOCKS, BLOCKS_PER_ACTOR * actors)))


def _pool(todo: list[dict[str, Any]], worker_cls: type, constructor_kwargs: dict[str, Any], actors: int,
          gpus: float, images_per_part: int, resources: dict[str, float] | None = None) -> Any:
    """The Ray Data pipeline: ``todo`` rows -> actor pool of ``worker_cls`` -> status rows.

    ``resources``: custom Ray resources each actor needs (places the pool on the nodes that offer them).
    """
    import ray

    blocks = input_blocks(len(todo), images_per_part, actors)
    ds = ray.data.from_items(todo, override_num_blocks=blocks)
    with warnings.catch_warnings():
        # max_restarts has no named parameter yet; the generic remote-args route warns it will change.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(
            _on_ray(worker_cls), fn_constructor_kwargs=constructor_kwargs, batch_size=images_per_part,
            batch_format="numpy", num_cpus=1, num_gpus=gpus if gpus > 0 else None, resources=resources or None,
            # more actors than batches would only load models that never run
            compute=ray.data.ActorPoolStrategy(size=max(1, min(actors, blocks))),
            max_restarts=0,  # see the module docstring: the driver replaces a lost pool instead
        )


def _process(store: CacheStore, todo: list[dict[str, Any]], progress: _Progress, max_attempts: int,
             **pool_args: Any) -> None:
    """Run the pool over ``todo``; if an actor dies, run a new pool over the images still missing.

    Gives up after ``max_attempts`` pools in a row lost actors before committing anything. Those wait
    before the next pool (RETRY_WAIT_S, then twice that): a pool started just after a node died can land
    on it again, since Ray only notices a lost node when its health checks time out.
    """
    import ray

    pending, barren = todo, 0
    while True:
        before = len(progress.seen)
        try:
            for batch in _pool(pending, **pool_args).iter_batches(batch_size=None, batch_format="numpy"):
                for stem, status, reason, node in zip(batch["stem"], batch["status"], batch["reason"],
                                                      batch["node_id"]):
                    progress.add(str(stem), str(status), str(reason), str(node))
            return
        except ray.exceptions.RayActorError as err:
            committed = store.committed_stems()
            for row in pending:  # committed by an actor that died before its status came back
                if row["stem"] not in progress.seen and row["stem"] in committed:
                    progress.add(row["stem"], STATUS_DONE)
            pending = [r for r in pending if r["stem"] not in progress.seen]
            if not pending:
                return
            barren = 0 if len(progress.seen) > before else barren + 1
            if barren >= max_attempts:
                raise
            wait = RETRY_WAIT_S * 2 ** (barren - 1) if barren else 0
            cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            say = progress.echo or (lambda msg: print(msg, file=sys.stderr))
            say(f"{progress.kind}: an actor was lost ({cause}); a new pool takes the {len(pending)} images left"
                + (f" in {wait:.0f} s ({barren}/{max_attempts} pools lost without progress)" if wait else ""))
            time.sleep(wait)


def run_cache_job(uri: str, kind: str, settings: dict[str, Any], rows: list[dict[str, Any]],
                  worker_cls: type, worker_kwargs: dict[str, Any] | Callable[[], dict[str, Any]], actors: int = 1,
                  gpus_per_actor: float | None = None, images_per_part: int = 8, limit: int = 0,
                  verbose: bool = False, echo: Callable[[str], None] | None = None,
                  max_attempts: int = MAX_ATTEMPTS, resources: dict[str, float] | None = None) -> JobSummary:
    """Process the ``rows`` ({image_id, stem, image_path, height, width}) missing from the cache at ``uri``.

    ``worker_cls(cache_uri, run_id, **worker_kwargs)`` is constructed once per actor (``worker_kwargs`` may
    be a function returning them, called once Ray is connected and only if some image is left, e.g. to
    put a model in the object store and pass its reference); ``limit`` > 0 caps
    how many missing images this run processes; ``echo`` receives progress lines; ``verbose`` lets Ray
    log everything; ``resources`` (e.g. {"node_b": 1}) are custom Ray resources each actor needs. Returns
    the counts the command prints.
    """
    store = CacheStore(uri)
    store.open_for_writing(kind, settings)
    done_before = store.committed_stems()
    previous_errors = set(store.read_errors().column("stem").to_pylist())
    todo = [r for r in rows if r["stem"] not in done_before]
    summary = JobSummary(total=len(rows), skipped=len(rows) - len(todo))
    if limit > 0:
        summary.remaining = max(0, len(todo) - limit)
        todo = todo[:limit]
    run_id = new_run_id()
    summary.run_id = run_id
    store.take_lease(run_id)
    # Actors on other nodes have other working directories: they get the absolute location.
    worker_uri = uri if "://" in str(uri) else store.root
    if todo:
        ensure_ray(verbose)
        gpus = default_gpus_per_actor() if gpus_per_actor is None else float(gpus_per_actor)
        kwargs = worker_kwargs() if callable(worker_kwargs) else worker_kwargs
        _process(store, todo, _Progress(kind, summary, len(todo), echo), max(1, max_attempts),
                 worker_cls=worker_cls, constructor_kwargs=dict(cache_uri=worker_uri, run_id=run_id, **kwargs),
                 actors=actors, gpus=gpus, images_per_part=images_per_part, resources=resources)
    store.require_lease(run_id)  # a newer run on this output finishes it: change nothing more
    # A worker of an earlier, killed run may have committed an image this run also did: keep one copy.
    store.drop_duplicate_rows()
    store.compact(run_id)
    attempted = {r["stem"] for r in todo}
    summary.retried = len(previous_errors & attempted)
    store.drop_retried_errors(run_id, attempted)
    if summary.remaining == 0:
        store.mark_success({"run_id": run_id, "total": summary.total, "done": summary.done,
                            "skipped": summary.skipped, "failed": summary.failed, "nodes": summary.nodes})
    return summary
