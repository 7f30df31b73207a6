"""Per-batch cache workers: load each image, run the model, commit the batch as one part.

A worker is a callable class: a distributed job constructs one per actor, so the model is loaded once
per actor, then calls it on batches of image rows ``{image_id, stem, image_path, height, width}``. Each
call commits its successful rows as one Parquet part and its failures (images that cannot be read or
processed) as one error part (see :mod:`dearli.caches.store`) before returning a small status table
``{stem, status, reason}``. Committing inside the worker means a crash loses at most the batches in flight.
An output that cannot be written is no image's failure: the batch reports it and the job stops.
No Ray import: any executor works.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from dearli.caches.generators import GeneratorSpec, build_generator
from dearli.caches.records import CLIP_SCHEMA, DEFAULT_MAX_PIXELS, SAM_SCHEMA, clip_row, load_rgb, sam_row
from dearli.caches.store import ERROR_SCHEMA, ERRORS_DIR, CacheStore, StaleWriterError
from dearli.errors import DataError, OutputError

STATUS_DONE = "done"
STATUS_FAILED = "failed"
STATUS_STALE = "stale"  # a newer run took over the output: the job stops
STATUS_UNWRITABLE = "unwritable"  # the output could not be written (disk full, read-only): the job stops


def _device() -> str:
    from dearli.device import resolve_device

    return str(resolve_device())


class CacheWorker:
    """Base class: subclasses set ``schema`` and implement ``process(item, image) -> row``."""

    schema: pa.Schema

    def __init__(self, cache_uri: str, run_id: str, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.store = CacheStore(cache_uri)
        self.run_id = run_id
        self.max_pixels = max_pixels

    def process(self, item: dict[str, Any], image: np.ndarray) -> dict[str, Any]:
        raise NotImplementedError

    def _one(self, item: dict[str, Any]) -> dict[str, Any]:
        image = load_rgb(item["image_path"], int(item.get("height", 0)), int(item.get("width", 0)),
                         self.max_pixels)
        return self.process(item, image)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """batch: columns image_id, stem, image_path, height, width -> columns stem, status, reason.

        A batch that cannot be written (:data:`STATUS_UNWRITABLE`) or whose run was superseded
        (:data:`STATUS_STALE`) commits nothing and gives every image that status, with the error as reason.
        """
        items = [{key: (values[i].item() if hasattr(values[i], "item") else values[i]) for key, values in batch.items()}
                 for i in range(len(batch["stem"]))]
        try:
            status, reasons = self._run_batch(items)
        except StaleWriterError as err:  # a newer run owns the output: this batch must not leave anything
            status, reasons = [STATUS_STALE] * len(items), [str(err)] * len(items)
        except OutputError as err:  # the output disk is full or read-only: no image is at fault
            status, reasons = [STATUS_UNWRITABLE] * len(items), [str(err)] * len(items)
        return {"stem": np.array([str(item["stem"]) for item in items], dtype=object),
                "status": np.array(status, dtype=object), "reason": np.array(reasons, dtype=object)}

    def _run_batch(self, items: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
        """Process and commit ``items``; (status, reason) per item."""
        rows, errors, status, reasons = [], [], [], []
        for item in items:
            try:
                rows.append(self._one(item))
                status.append(STATUS_DONE)
                reasons.append("")
            except (StaleWriterError, OutputError):
                raise
            except Exception as err:  # one bad image must not stop the job: record it and go on
                reason = err.problem if isinstance(err, DataError) else f"{type(err).__name__}: {err}"
                errors.append({"image_id": str(item["image_id"]), "stem": item["stem"],
                               "image_path": item["image_path"], "reason": reason, "run_id": self.run_id})
                status.append(STATUS_FAILED)
                reasons.append(reason)
        if rows:
            self.store.commit(pa.Table.from_pylist(rows, schema=self.schema), self.run_id)
        if errors:
            self.store.commit(pa.Table.from_pylist(errors, schema=ERROR_SCHEMA), self.run_id, ERRORS_DIR)
        return status, reasons


class SamWorker(CacheWorker):
    """Class-agnostic masks from a :class:`GeneratorSpec` generator (SAM or Felzenszwalb)."""

    schema = SAM_SCHEMA

    def __init__(self, cache_uri: str, run_id: str, spec: dict[str, Any], max_pixels: int = DEFAULT_MAX_PIXELS):
        super().__init__(cache_uri, run_id, max_pixels)
        values = dict(spec, device=_device()) if spec.get("kind") == "sam" else dict(spec)
        self.generator = build_generator(GeneratorSpec(**values))

    def process(self, item: dict[str, Any], image: np.ndarray) -> dict[str, Any]:
        masks = self.generator.generate(image)
        return sam_row(item["image_id"], item["stem"], image.shape[0], image.shape[1], masks)


class ClipWorker(CacheWorker):
    """Dense CLIP features (raw ``clip_vis_dense``, float16) at the test-time scale."""

    schema = CLIP_SCHEMA

    def __init__(self, cache_uri: str, run_id: str, settings: dict[str, Any],
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        super().__init__(cache_uri, run_id, max_pixels)
        from dearli.caches.clip_features import build_cache_backbone

        self.settings = settings
        self.backbone = build_cache_backbone(settings["clip_model"], settings["pretrained"]).to(_device())

    def process(self, item: dict[str, Any], image: np.ndarray) -> dict[str, Any]:
        from dearli.caches.clip_features import dense_feature

        feature, scale, resized, padded = dense_feature(self.backbone, image, self.settings)
        return clip_row(item["image_id"], item["stem"], image.shape[0], image.shape[1], feature, scale,
                        resized, padded)
