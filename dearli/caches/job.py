"""Run a cache job on Ray Data: image list -> actor pool of workers -> committed Parquet parts.

The driver lists the images still missing from the cache (resume), Ray Data streams them through an
actor pool (one model per actor, GPUs when the cluster has them), every batch is committed by the
actor that computed it, and the driver gathers the per-image status rows into a summary.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from dearli.caches.store import CacheStore, new_run_id
from dearli.caches.workers import STATUS_DONE, STATUS_FAILED


@dataclass
class JobSummary:
    total: int = 0  # images in the list
    done: int = 0  # processed and committed by this run
    skipped: int = 0  # already in the cache before this run
    failed: int = 0  # recorded in the errors table by this run
    retried: int = 0  # images that had failed in an earlier run and were attempted again
    remaining: int = 0  # still missing after this run because of --limit
    failures: list[tuple[str, str]] = field(default_factory=list)  # (stem, reason)

    def line(self, uri: str) -> str:
        text = (f"{uri}: {self.total} images: {self.done} done, {self.skipped} skipped (already cached), "
                f"{self.failed} failed")
        if self.retried:
            text += f" ({self.retried} retried from earlier runs)"
        if self.remaining:
            text += f", {self.remaining} left for a later run (--limit)"
        return text


def ensure_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS, or start a local one, unless already connected."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)


@contextmanager
def ray_session() -> Iterator[None]:
    """Use the Ray instance already connected, or start one (RAY_ADDRESS or local) for the block only."""
    import ray

    started_here = not ray.is_initialized()
    ensure_ray()
    try:
        yield
    finally:
        if started_here:
            ray.shutdown()


def default_gpus_per_actor() -> float:
    """1 when the Ray cluster has GPUs, else 0 (CPU actors)."""
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def run_cache_job(uri: str, kind: str, settings: dict[str, Any], rows: list[dict[str, Any]],
                  worker_cls: type, worker_kwargs: dict[str, Any], actors: int = 1,
                  gpus_per_actor: float | None = None, images_per_part: int = 8, limit: int = 0) -> JobSummary:
    """Process the ``rows`` ({image_id, stem, image_path, height, width}) missing from the cache at ``uri``.

    ``worker_cls(cache_uri, run_id, **worker_kwargs)`` is constructed once per actor; ``limit`` > 0 caps
    how many missing images this run processes. Returns the counts the command prints.
    """
    import ray

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
    store.take_lease(run_id)
    if todo:
        ensure_ray()
        gpus = default_gpus_per_actor() if gpus_per_actor is None else float(gpus_per_actor)
        ds = ray.data.from_items(todo, override_num_blocks=math.ceil(len(todo) / images_per_part))
        ds = ds.map_batches(
            worker_cls, fn_constructor_kwargs=dict(cache_uri=uri, run_id=run_id, **worker_kwargs),
            batch_size=images_per_part, batch_format="numpy", num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=max(1, actors)),
            num_gpus=gpus if gpus > 0 else None,
        )
        statuses = ds.take_all()
        for status in statuses:
            if status["status"] == STATUS_DONE:
                summary.done += 1
            elif status["status"] == STATUS_FAILED:
                summary.failed += 1
                summary.failures.append((status["stem"], status["reason"]))
    # A worker of an earlier, killed run may have committed an image this run also did: keep one copy.
    store.drop_duplicate_rows()
    attempted = {r["stem"] for r in todo}
    summary.retried = len(previous_errors & attempted)
    store.drop_retried_errors(run_id, attempted)
    if summary.remaining == 0:
        store.mark_success({"run_id": run_id, "total": summary.total, "done": summary.done,
                            "skipped": summary.skipped, "failed": summary.failed})
    return summary
