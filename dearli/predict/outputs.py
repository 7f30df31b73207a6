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
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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


def read_table(store: CacheStore) -> pa.Table:
    """Every committed image row (ROW_SCHEMA), sorted by stem: the first copy of a stem in part order, as
    readers do. The rows stay in Arrow's columns: a few hundred bytes an image, not Python objects."""
    tables = [pq.read_table(path, filesystem=store.fs).cast(ROW_SCHEMA) for path in store.part_files()]
    if not tables:
        return ROW_SCHEMA.empty_table()
    table = pa.concat_tables(tables)
    first: dict[str, int] = {}
    for index, stem in enumerate(table.column("stem").to_pylist()):
        first.setdefault(stem, index)
    return table.take(pa.array([first[stem] for stem in sorted(first)], pa.int64()))


def read_rows(store: CacheStore) -> list[dict[str, Any]]:
    """Every committed image row as a dict, sorted by stem (see :func:`read_table`)."""
    return read_table(store).to_pylist()


def _image_entry(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["image_id"], "file_name": row["image_path"].replace("\\", "/").rsplit("/", 1)[-1],
            "height": row["height"], "width": row["width"]}


def _annotation_entry(row: dict[str, Any]) -> dict[str, Any]:
    infos = [{"id": s["id"], "category_id": s["category_id"], "iscrowd": 0, "isthing": int(s["isthing"]),
              "area": s["area"], "bbox": s["bbox"], "score": s["score"]} for s in row["segments"]]
    return {"image_id": row["image_id"], "file_name": row["file_name"], "segments_info": infos}


def panoptic_json_chunks(table: pa.Table, categories: Any, rows_per_chunk: int = 2048) -> Iterator[bytes]:
    """The COCO panoptic JSON of committed rows (segments carry their ``score`` beside the COCO keys), in
    chunks of ``rows_per_chunk`` images: the text ``json.dumps`` gives the whole dict, never whole in memory."""
    for entry, opening in ((_image_entry, '{"images": ['), (_annotation_entry, '], "annotations": [')):
        yield opening.encode()
        separator = ""
        for batch in table.to_batches(max_chunksize=rows_per_chunk):
            items = [json.dumps(entry(row)) for row in batch.to_pylist()]
            if items:
                yield (separator + ", ".join(items)).encode()
                separator = ", "
    yield f'], "categories": {json.dumps([c.to_dict() for c in categories.categories])}}}'.encode()


def segments_table(table: pa.Table) -> pa.Table:
    """One row per segment (SEGMENTS_SCHEMA) of the image rows in ``table``, flattened in Arrow."""
    segments = table.column("segments").combine_chunks()
    parents = pc.list_parent_indices(segments)
    flat = pc.list_flatten(segments)
    columns = {name: table.column(name).take(parents) for name in ("image_id", "stem", "image_path")}
    columns["segment_id"] = flat.field("id")
    for name in ("category_id", "category_name", "isthing", "score", "area", "bbox"):
        columns[name] = flat.field(name)
    return pa.table(columns, schema=SEGMENTS_SCHEMA)


def _png_files(store: CacheStore) -> list[pafs.FileInfo]:
    infos = store.fs.get_file_info(pafs.FileSelector(store.path(PANOPTIC_DIR), allow_not_found=True))
    return [info for info in infos if info.type == pafs.FileType.File]


def _remove_orphan_pngs(store: CacheStore, keep: set[str], files: list[pafs.FileInfo]) -> int:
    """Delete the ``files`` of panoptic/ no committed row names (an image whose part was never committed, a
    killed write's temporary file); returns how many."""
    removed = 0
    for info in files:
        if info.base_name not in keep:
            with writing(info.path):
                store.fs.delete_file(info.path)
            removed += 1
    return removed


def assemble(uri: str, categories: Any, run_id: str) -> dict[str, Any]:
    """Write panoptic.json, segments.parquet and errors.parquet from the committed parts at ``uri``.

    Only while ``run_id`` holds the writer lease (StaleWriterError otherwise, before anything changes).
    Returns counts: images, segments, failed (images still missing because they could not be read), and
    ``missing``: the stems whose PNG was gone, uncommitted and left out.
    """
    store = CacheStore(uri)
    store.require_lease(run_id)
    table = read_table(store)
    files = _png_files(store)
    present = {info.base_name for info in files}
    has_png = pa.array([name in present for name in table.column("file_name").to_pylist()], pa.bool_())
    missing = sorted(table.filter(pc.invert(has_png)).column("stem").to_pylist())
    if missing:  # uncommitted: a rerun labels them again
        store.drop_rows(set(missing))
        store.clear_success()
        table = table.filter(has_png)
    _remove_orphan_pngs(store, set(table.column("file_name").to_pylist()), files)
    write_atomic(store.path(PANOPTIC_JSON), panoptic_json_chunks(table, categories), store.fs)
    segments = segments_table(table)
    _write_table(store, SEGMENTS_FILE, segments)
    errors = store.read_errors().sort_by("stem")
    _write_table(store, ERRORS_FILE, errors)
    return {"images": table.num_rows, "segments": segments.num_rows, "failed": errors.num_rows,
            "missing": missing}
