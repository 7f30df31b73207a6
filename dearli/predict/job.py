"""Batch pseudo-labelling on Ray Data: the cache job runner with the pseudo-labelling worker.

The checkpoint is read once by the driver and put in the object store; every actor fetches it from
there, so the file need only exist where the command runs (not on every node of a cluster).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray

from dearli.caches.job import JobSummary, run_cache_job
from dearli.predict.outputs import KIND
from dearli.predict.worker import PseudoLabelWorker, model_payload


class RayPseudoLabelWorker(PseudoLabelWorker):
    """:class:`PseudoLabelWorker` taking its checkpoint payload as an object reference."""

    def __init__(self, cache_uri: str, run_id: str, checkpoint_ref: Any, **kwargs: Any):
        super().__init__(cache_uri, run_id, checkpoint=ray.get(checkpoint_ref), **kwargs)


def run_pseudo_label_job(out: str, rows: list[dict[str, Any]], payload: dict[str, Any], classes: list[dict],
                         settings: dict[str, Any], min_score: float = 0.0, alpha_clip: float | None = None,
                         actors: int = 1, gpus_per_actor: float | None = None, batch_size: int = 8,
                         max_pixels: int | None = None, resources: dict[str, float] | None = None,
                         verbose: bool = False,
                         echo: Callable[[str], None] | None = print) -> JobSummary:
    """Pseudo-label the ``rows`` ({image_id, stem, image_path, height, width}) missing from ``out``.

    ``payload`` is a loaded checkpoint, ``classes`` the class list as ``classes.json`` entries and
    ``settings`` what the output's manifest records (a rerun with other settings is refused);
    ``resources`` are custom Ray resources each actor needs.
    """
    def worker_kwargs() -> dict[str, Any]:  # called only when some image is left, with Ray connected
        kwargs = {"checkpoint_ref": ray.put(model_payload(payload)), "classes": classes,
                  "min_score": min_score, "alpha_clip": alpha_clip}
        return kwargs if max_pixels is None else {**kwargs, "max_pixels": max_pixels}

    return run_cache_job(out, KIND, settings, rows, RayPseudoLabelWorker, worker_kwargs, actors=actors,
                         gpus_per_actor=gpus_per_actor, images_per_part=batch_size, verbose=verbose, echo=echo,
                         resources=resources)
