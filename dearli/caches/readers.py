"""Read committed caches lazily (no Ray): ``read_sam_cache(uri)[stem] -> row``, ``decode_masks(row)``.

Opening a cache reads only the ``stem`` column of every committed part to build an index; a row is
read from its part on first access (the last part read is kept, so iterating in storage order reads
each part once). Uncommitted files (``_tmp/``) are never looked at; a stem present in several parts
(only possible with overlapping writers) resolves to the first part in name order.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dearli.caches.records import decode_feature, decode_rles
from dearli.caches.store import ERRORS_DIR, CacheStore
from dearli.errors import DataError

TEXT_FILE = "text.parquet"


class CacheReader(Mapping):
    """stem -> row dict of one committed cache (see :mod:`dearli.caches.records` for the columns)."""

    def __init__(self, uri: str, kind: str):
        self.store = CacheStore(uri)
        manifest = self.store.manifest()
        if manifest is None:
            raise DataError(uri, "not a dearli cache (no cache.json); run 'dearli cache' first")
        if manifest.get("kind") != kind:
            raise DataError(uri, f"is a {manifest.get('kind')!r} cache, expected a {kind!r} cache")
        self.uri = str(uri)
        self.kind = kind
        self.settings: dict[str, Any] = manifest.get("settings", {})
        self._index: dict[str, tuple[str, int]] = {}
        for path in self.store.part_files():
            stems = pq.read_table(path, columns=["stem"], filesystem=self.store.fs).column("stem").to_pylist()
            for i, stem in enumerate(stems):
                self._index.setdefault(stem, (path, i))
        self._part: tuple[str, pa.Table] | None = None

    def __len__(self) -> int:
        return len(self._index)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __contains__(self, stem: object) -> bool:
        return stem in self._index

    def __getitem__(self, stem: str) -> dict[str, Any]:
        path, i = self._index[stem]
        if self._part is None or self._part[0] != path:
            self._part = (path, pq.read_table(path, filesystem=self.store.fs))
        return self._part[1].slice(i, 1).to_pylist()[0]

    def mask_counts(self) -> dict[str, int]:
        """stem -> number of masks, for a SAM cache (reads only the ``stem`` and ``area`` columns)."""
        counts: dict[str, int] = {}
        for path in self.store.part_files():
            table = pq.read_table(path, columns=["stem", "area"], filesystem=self.store.fs)
            for stem, areas in zip(table.column("stem").to_pylist(), table.column("area").to_pylist()):
                counts.setdefault(stem, len(areas or []))
        return counts

    def errors(self) -> pa.Table:
        """Images that failed and are still missing: image_id, stem, image_path, reason, run_id."""
        return self.store.read_errors()

    @property
    def complete(self) -> bool:
        """Whether the last run finished with every image of its list processed (``_SUCCESS``)."""
        return self.store.has_success()


def read_sam_cache(uri: str) -> CacheReader:
    """Committed SAM masks: stem -> {image_id, stem, height, width, rle_counts, area, bbox, ...}."""
    return CacheReader(uri, "sam")


def read_clip_cache(uri: str) -> CacheReader:
    """Committed CLIP features: stem -> {image_id, stem, height, width, feature, feature_shape, ...}."""
    return CacheReader(uri, "clip")


def without_masks(reader: CacheReader) -> list[str]:
    """Stems of a SAM cache's images that hold no mask (sorted)."""
    return sorted(stem for stem, count in reader.mask_counts().items() if count == 0)


def decode_masks(row: dict[str, Any]) -> np.ndarray:
    """A SAM cache row -> N×H×W bool masks (in the row's mask order)."""
    return decode_rles(row["rle_counts"], row["height"], row["width"])


def read_text_embeddings(uri: str) -> pa.Table:
    """The class text-embedding table of a CLIP cache (class_index, category_id, synonym, embedding)."""
    store = CacheStore(uri)
    path = store.path(TEXT_FILE)
    try:
        return pq.read_table(path, filesystem=store.fs)
    except (OSError, pa.ArrowInvalid) as err:
        raise DataError(path, f"cannot read the cache's text embeddings ({err})") from err


__all__ = ["CacheReader", "read_sam_cache", "without_masks", "read_clip_cache", "decode_masks", "decode_feature",
           "read_text_embeddings", "ERRORS_DIR"]
