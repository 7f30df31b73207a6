"""What ``dearli pseudo-label`` writes, and how the final files are assembled from committed parts (no Ray).

An output directory is a cache (:mod:`dearli.caches.store`: manifest, writer lease, ``parts/``,
``errors/``, ``_tmp/``) of kind ``pseudo-label`` with one committed row per image, plus::

    panoptic/<stem>.png     segment ids as COCO panoptic PNGs (id = R + 256·G + 256²·B), written by the
                            worker (through a temporary file and a rename) before the part naming it is committed
    panoptic.json           COCO panoptic annotations of every committed image    } assembled at the end
    segments.parquet        one row per segment, with its class score              } of every run from the
    errors.parquet          images that could not be read, with the reason        } committed parts

Assembling from the parts (rather than appending as images finish) is what makes a killed and rerun job
end with exactly one entry per image. Only the run holding the writer lease assembles; a committed row
whose PNG is gone is uncommitted (a rerun labels that image again) rather than published.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dearli.caches.store import CacheStore, parquet_bytes, write_atomic, writing
from dearli.data.writing import mask_area_bbox

KIND = "pseudo-label"
PANOPTIC_DIR = "panoptic"
PANOPTIC_JSON = "panoptic.json"
SEGMENTS_FILE = "segments.parquet"
ERRORS_FILE = "errors.parquet"

SEGMENT_TYPE = pa.struct([("id", pa.int64()), ("category_id", pa.int64()), ("category_name", pa.string()),
                          ("isthing", pa.bool_()), ("score", pa.float64()), ("area", pa.int64()),
                          ("bbox", pa.list_(pa.float64(), 4))])
ROW_SCHEMA = pa.schema([("image_id", pa.string()), ("stem", pa.string()), ("image_path", pa.string()),
                        ("height", pa.int32()), ("width", pa.int32()), ("file_name", pa.string()),
                        ("segments", pa.list_(SEGMENT_TYPE))])
SEGMENTS_SCHEMA = pa.schema([("image_id", pa.string()), ("stem", pa.string()), ("image_path", pa.string()),
                             ("segment_id", pa.int64()), ("category_id", pa.int64()),
                             ("category_name", pa.string()), ("isthing", pa.bool_()), ("score", pa.float64()),
                             ("area", pa.int64()), ("bbox", pa.list_(pa.float64(), 4))])


def keep_confident(panoptic: np.ndarray, segments: list[dict], min_score: float) -> tuple[np.ndarray, list[dict]]:
    """Drop the segments whose class score is below ``min_score``; their pixels become unlabeled (0).

    panoptic: H×W segment ids; segments: dicts with "id" and "score". Returns new objects.
    """
    kept = [s for s in segments if float(s.get("score", 1.0)) >= min_score]
    dropped = [s["id"] for s in segments if float(s.get("score", 1.0)) < min_score]
    if not dropped:
        return panoptic, kept
    return np.where(np.isin(panoptic, dropped), 0, panoptic).astype(panoptic.dtype), kept


def segment_records(panoptic: np.ndarray, segments: list[dict], categories: Any) -> list[dict[str, Any]]:
    """Segments of a prediction (contiguous ``category_id``) -> rows of SEGMENT_TYPE (dataset ids, names).

    ``categories`` is the CategoryMap the model classified with; area and bbox (x, y, w, h) are measured
    on ``panoptic`` (H×W); segments without a pixel are left out.
    """
    records = []
    for seg in segments:
        area, (x, y, width, height) = mask_area_bbox(panoptic == seg["id"])  # one H×W bool at a time
        if area == 0:
            continue
        category = categories.categories[int(seg["category_id"])]
        records.append({
            "id": int(seg["id"]), "category_id": int(category.id), "category_name": category.name,
            "isthing": bool(seg["isthing"]), "score": float(seg.get("score", 1.0)), "area": area,
            "bbox": [float(x), float(y), float(width), float(height)],
        })
    return records


def _write_table(store: CacheStore, name: str, table: pa.Table) -> None:
    write_atomic(store.path(name), parquet_bytes(table), store.fs)


def read_rows(store: CacheStore) -> list[dict[str, Any]]:
    """Every committed image row, sorted by stem (first copy of a stem in part order, as readers do)."""
    rows: dict[str, dict[str, Any]] = {}
    for path in store.part_files():
        for row in pq.read_table(path, filesystem=store.fs).to_pylist():
            rows.setdefault(row["stem"], row)
    return [rows[stem] for stem in sorted(rows)]


def panoptic_json(rows: list[dict[str, Any]], categories: Any) -> dict[str, Any]:
    """The COCO panoptic dict of committed rows; segments carry their ``score`` beside the COCO keys."""
    images, annotations = [], []
    for row in rows:
        images.append({"id": row["image_id"], "file_name": row["image_path"].replace("\\", "/").rsplit("/", 1)[-1],
                       "height": row["height"], "width": row["width"]})
        infos = [{"id": s["id"], "category_id": s["category_id"], "iscrowd": 0, "isthing": int(s["isthing"]),
                  "area": s["area"], "bbox": s["bbox"], "score": s["score"]} for s in row["segments"]]
        annotations.append({"image_id": row["image_id"], "file_name": row["file_name"], "segments_info": infos})
    return {"images": images, "annotations": annotations,
            "categories": [c.to_dict() for c in categories.categories]}


def segments_table(rows: list[dict[str, Any]]) -> pa.Table:
    flat = [{"image_id": row["image_id"], "stem": row["stem"], "image_path": row["image_path"],
             "segment_id": s["id"], **{k: s[k] for k in ("category_id", "category_name", "isthing", "score",
                                                         "area", "bbox")}}
            for row in rows for s in row["segments"]]
    return pa.Table.from_pylist(flat, schema=SEGMENTS_SCHEMA)


def _png_files(store: CacheStore) -> list[pafs.FileInfo]:
    infos = store.fs.get_file_info(pafs.FileSelector(store.path(PANOPTIC_DIR), allow_not_found=True))
    return [info for info in infos if info.type == pafs.FileType.File]


def _remove_orphan_pngs(store: CacheStore, keep: set[str]) -> int:
    """Delete the files of panoptic/ no committed row names (an image whose part was never committed, a
    killed write's temporary file); returns how many."""
    removed = 0
    for info in _png_files(store):
        if info.base_name not in keep:
            with writing(info.path):
                store.fs.delete_file(info.path)
            removed += 1
    return removed


def _drop_rows_without_png(store: CacheStore, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Uncommit the rows whose PNG is missing (a rerun labels them again); returns those rows."""
    present = {info.base_name for info in _png_files(store)}
    missing = [row for row in rows if row["file_name"] not in present]
    if missing:
        store.drop_rows({row["stem"] for row in missing})
        store.clear_success()
    return missing


def assemble(uri: str, categories: Any, run_id: str) -> dict[str, Any]:
    """Write panoptic.json, segments.parquet and errors.parquet from the committed parts at ``uri``.

    Only while ``run_id`` holds the writer lease (StaleWriterError otherwise, before anything changes).
    Returns counts: images, segments, failed (images still missing because they could not be read), and
    ``missing``: the stems whose PNG was gone, uncommitted and left out.
    """
    store = CacheStore(uri)
    store.require_lease(run_id)
    rows = read_rows(store)
    missing = {row["stem"] for row in _drop_rows_without_png(store, rows)}
    rows = [row for row in rows if row["stem"] not in missing]
    _remove_orphan_pngs(store, {row["file_name"] for row in rows})
    write_atomic(store.path(PANOPTIC_JSON), json.dumps(panoptic_json(rows, categories)).encode(), store.fs)
    segments = segments_table(rows)
    _write_table(store, SEGMENTS_FILE, segments)
    errors = store.read_errors().sort_by("stem")
    _write_table(store, ERRORS_FILE, errors)
    return {"images": len(rows), "segments": segments.num_rows, "failed": errors.num_rows,
            "missing": sorted(missing)}
