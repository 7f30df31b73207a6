"""What ``dearli pseudo-label`` writes, and how the final files are assembled from committed parts (no Ray).

An output directory is a cache (:mod:`dearli.caches.store`: manifest, writer lease, ``parts/``,
``errors/``, ``_tmp/``) of kind ``pseudo-label`` with one committed row per image, plus::

    panoptic/<stem>.png     segment ids as COCO panoptic PNGs (id = R + 256·G + 256²·B), written by the
                            worker (through _tmp/ and a rename) before the part naming it is committed
    panoptic.json           COCO panoptic annotations of every committed image    } assembled at the end
    segments.parquet        one row per segment, with its class score              } of every run from the
    errors.parquet          images that could not be read, with the reason        } committed parts

Assembling from the parts (rather than appending as images finish) is what makes a killed and rerun job
end with exactly one entry per image.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dearli.caches.store import TMP_DIR, CacheStore

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
        ys, xs = np.nonzero(panoptic == seg["id"])
        if len(ys) == 0:
            continue
        category = categories.categories[int(seg["category_id"])]
        records.append({
            "id": int(seg["id"]), "category_id": int(category.id), "category_name": category.name,
            "isthing": bool(seg["isthing"]), "score": float(seg.get("score", 1.0)), "area": int(len(ys)),
            "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)],
        })
    return records


def write_atomic(store: CacheStore, name: str, data: bytes, tmp_name: str | None = None) -> None:
    """Write ``data`` to ``name`` (a path inside the output) through ``_tmp/`` and a rename.

    ``tmp_name`` must be unique to the writer when several may write the same file at once.
    """
    tmp = store.path(TMP_DIR, tmp_name or name.replace("/", "_"))
    store.fs.create_dir(store.path(TMP_DIR), recursive=True)
    if "/" in name:
        store.fs.create_dir(store.path(name.rsplit("/", 1)[0]), recursive=True)
    with store.fs.open_output_stream(tmp) as out:
        out.write(data)
    store.fs.move(tmp, store.path(name))


def _write_table(store: CacheStore, name: str, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_atomic(store, name, sink.getvalue().to_pybytes())


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


def _remove_orphan_pngs(store: CacheStore, keep: set[str]) -> int:
    """Delete PNGs no committed row names (an image whose part was never committed); returns how many."""
    folder = store.path(PANOPTIC_DIR)
    if store.fs.get_file_info(folder).type == pafs.FileType.NotFound:
        return 0
    removed = 0
    for info in store.fs.get_file_info(pafs.FileSelector(folder)):
        if info.type == pafs.FileType.File and info.base_name not in keep:
            store.fs.delete_file(info.path)
            removed += 1
    return removed


def assemble(uri: str, categories: Any) -> dict[str, int]:
    """Write panoptic.json, segments.parquet and errors.parquet from the committed parts at ``uri``.

    Returns counts: images, segments, failed (images still missing because they could not be read).
    """
    store = CacheStore(uri)
    rows = read_rows(store)
    _remove_orphan_pngs(store, {row["file_name"] for row in rows})
    write_atomic(store, PANOPTIC_JSON, json.dumps(panoptic_json(rows, categories)).encode())
    segments = segments_table(rows)
    _write_table(store, SEGMENTS_FILE, segments)
    errors = store.read_errors().sort_by("stem")
    _write_table(store, ERRORS_FILE, errors)
    return {"images": len(rows), "segments": segments.num_rows, "failed": errors.num_rows}
