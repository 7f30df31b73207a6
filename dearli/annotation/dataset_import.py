"""Imported annotations written into a dataset: annotations of its train split and a partition listing them.

``dearli train --partition NAME`` trains on the images a partition lists, with their annotations in the
split's panoptic JSON and PNG folder; the images the partition leaves out are its unlabeled pool and need
none. So an import, for each of its images (which must be images of the split):

- writes the image's panoptic PNG (and semantic PNG, when the split has ``semantic_dir``) under a name no
  file has yet (``<stem>.png``, else ``<stem>_1.png``, ...): no existing file is overwritten;
- adds the image's annotation to the split's panoptic JSON, or replaces the one it has. The JSON is
  checked against the new PNGs and then replaced whole (a temporary file, then a rename), after every PNG
  is in place: readers see the dataset before or after the import, never half of it;
- keeps what it replaces in ``RECORD/replaced.json`` (the replaced images' entries as a COCO panoptic file)
  and ``RECORD/replaced/panoptic/`` (``semantic/``), their PNGs, moved there once the new JSON is in place.

Then it writes partition NAME: the lines of the base partition, then one line per imported image not in it.
An existing partition NAME is replaced only when asked; its labeled.txt is kept as
``RECORD/previous_labeled.txt``. ``RECORD`` is ``DATASET/label_studio_imports/<UTC time>_<NAME>/``; it also
holds ``report.json`` (what was imported, what was replaced, every problem) and ``unusable.csv``.

One import at a time writes into a dataset (:func:`import_lock`): a second one started meanwhile stops at
once with an error, before it has read or written anything.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dearli.annotation.label_studio_results import Problem
from dearli.caches.store import write_atomic
from dearli.data.coco_format import IGNORE_LABEL, id2rgb
from dearli.data.panoptic import CategoryMap, PanopticSplit, read_segment_map
from dearli.data.panoptic_json import parse_records, read_json
from dearli.data.partitions import LABELED_FILE, Partition
from dearli.data.writing import relative_to
from dearli.errors import DataError

IMPORTS_DIR = "label_studio_imports"


@contextmanager
def import_lock(dataset: str | Path) -> Iterator[Path]:
    """Hold the dataset's import lock for the block (DataError at once if another import holds it).

    An advisory ``flock`` on the dataset's folder itself (no lock file is made): the system releases it when
    the process ends, however it ends, so a killed import leaves no stale lock behind."""
    import fcntl

    path = Path(dataset)
    try:
        handle = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as err:
        raise DataError(path, f"cannot open the dataset folder to lock it: {err.strerror or err}") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(path, "another import into this dataset is running; run this one when it "
                                  "has ended") from None
        yield path
    finally:
        os.close(handle)  # closing the only descriptor releases the lock


@dataclass
class ImportedImage:
    """One image to import: H×W int64 segment map (0 = unlabeled) and its ``segments_info`` entries."""

    stem: str
    task: Any
    segment_map: np.ndarray
    segments: list[dict[str, Any]]


@dataclass(frozen=True)
class ImportTarget:
    """Where an import writes: the dataset root, the split's files and the partition folder."""

    root: Path
    split: PanopticSplit
    image_dir: Path
    panoptic_dir: Path
    semantic_dir: Path | None
    partition_dir: Path


def import_target(info: Any, split_name: str, partition: str) -> ImportTarget:
    """The ImportTarget of split ``split_name`` and partition ``partition`` of a DatasetInfo."""
    if info.partitions_dir is None:
        raise DataError(info.source, "the dataset has no partitions folder to write the partition into: create "
                                     "one (e.g. partitions/) and name it in dataset.yaml ('partitions: partitions')")
    if not partition or Path(partition).name != partition or partition.startswith("."):
        raise DataError(None, f"--partition must be a plain folder name, got {partition!r}")
    split, spec = info.split(split_name), info.splits[split_name]
    semantic = None if spec.semantic_dir is None else info.root / spec.semantic_dir
    return ImportTarget(info.root, split, info.root / spec.image_dir, info.root / spec.panoptic_dir, semantic,
                        info.partitions_dir / partition)


def refuse_partition(target: ImportTarget, overwrite: bool) -> None:
    path = target.partition_dir / LABELED_FILE
    if path.exists() and not overwrite:
        raise DataError(path, "exists already; pass --overwrite to replace it (it is kept in the import's "
                              "record) or choose another --partition")


def new_record_dir(root: Path, partition: str) -> Path:
    """A new folder ``root/label_studio_imports/<UTC time>_<partition>`` (a suffix if that one exists)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for k in range(1000):
        path = root / IMPORTS_DIR / (f"{stamp}_{partition}" + (f"_{k}" if k else ""))
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise DataError(root / IMPORTS_DIR, "cannot create a new import record folder")


def free_png_name(stem: str, taken: set[str], folders: list[Path]) -> str:
    """``<stem>.png``, else ``<stem>_<k>.png``: the first name neither in ``taken`` nor a file of ``folders``."""
    for k in range(100000):
        name = f"{stem}.png" if k == 0 else f"{stem}_{k}.png"
        if name not in taken and not any((folder / name).exists() for folder in folders):
            return name
    raise DataError(folders[0], f"no free PNG name for '{stem}'")


def _png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def write_label_pngs(target: ImportTarget, image: ImportedImage, name: str) -> list[Path]:
    """Write the image's panoptic PNG (and semantic PNG) as ``name``; returns the paths written."""
    written = [target.panoptic_dir / name]
    write_atomic(written[0], _png_bytes(id2rgb(image.segment_map)))
    if target.semantic_dir is not None:
        cats = target.split.categories
        semantic = np.full(image.segment_map.shape, IGNORE_LABEL, np.uint8)
        for info in image.segments:
            semantic[image.segment_map == info["id"]] = cats.to_contiguous(info["category_id"])
        written.append(target.semantic_dir / name)
        write_atomic(written[1], _png_bytes(semantic, "L"))
    return written


def updated_json(data: dict[str, Any], images: list[ImportedImage], names: dict[str, str]
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The split's JSON with the imported images' annotations added or replaced, and the replaced entries
    (``{"images": [...], "annotations": [...]}``). ``names``: stem -> new PNG file name."""
    entries = {Path(str(image["file_name"])).stem: image for image in data["images"] if isinstance(image, dict)}
    annotations = list(data.get("annotations", []))
    position = {str(a.get("image_id")): k for k, a in enumerate(annotations) if isinstance(a, dict)}
    replaced: dict[str, list[Any]] = {"images": [], "annotations": []}
    for image in images:
        entry = entries[image.stem]
        new = {"image_id": entry["id"], "file_name": names[image.stem], "segments_info": image.segments}
        k = position.get(str(entry["id"]))
        if k is None:
            annotations.append(new)
        else:
            replaced["images"].append(entry)
            replaced["annotations"].append(annotations[k])
            annotations[k] = new
    return {**data, "annotations": annotations}, replaced


def check_json(target: ImportTarget, data: dict[str, Any], stems: list[str]) -> None:
    """Parse the new JSON as readers will, and read each imported PNG against it (DataError if anything is off)."""
    records = parse_records(data, target.split.json_path, target.image_dir, target.panoptic_dir,
                            target.semantic_dir, target.split.categories, None)
    by_stem = {record.stem: record for record in records}
    for stem in stems:
        read_segment_map(by_stem[stem], target.split.json_path)


def keep_replaced(record: Path, target: ImportTarget, replaced: dict[str, Any], categories: CategoryMap) -> list[Path]:
    """Copy the replaced annotations into the record (replaced.json, replaced/panoptic|semantic/*.png);
    returns the dataset's PNGs they name (to delete once the new JSON is in place)."""
    if not replaced["annotations"]:
        return []
    doc = {**replaced, "categories": [c.to_dict() for c in categories.categories]}
    write_atomic(record / "replaced.json", json.dumps(doc).encode())
    originals = []
    for annotation in replaced["annotations"]:
        for folder, kind in ((target.panoptic_dir, "panoptic"), (target.semantic_dir, "semantic")):
            source = None if folder is None else folder / str(annotation["file_name"])
            if source is not None and source.is_file():
                (record / "replaced" / kind).mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, record / "replaced" / kind / source.name)
                originals.append(source)
    return originals


def partition_lines(target: ImportTarget, base: Partition | None, names: dict[str, str]) -> list[str]:
    """The base partition's lines, then 'image annotation' of each imported stem it does not list."""
    lines = [] if base is None or base.path is None else \
        [line.strip() for line in base.path.read_text(encoding="utf-8").splitlines() if line.strip()]
    listed = set(base.labeled) if base is not None else set()
    for stem, name in names.items():
        if stem not in listed:
            image = relative_to(target.split.record(stem).image_path, target.root)
            lines.append(f"{image} {relative_to(target.panoptic_dir / name, target.root)}")
    return lines


def write_partition(target: ImportTarget, record: Path, lines: list[str], overwrite: bool) -> Path:
    """Publish NAME/labeled.txt whole; an existing one (only with ``overwrite``) is kept in the record first."""
    refuse_partition(target, overwrite)
    path = target.partition_dir / LABELED_FILE
    if path.exists():
        shutil.copy2(path, record / "previous_labeled.txt")
    write_atomic(path, ("\n".join(lines) + "\n").encode())
    return path


def write_report(record: Path, report: dict[str, Any], problems: list[Problem]) -> None:
    """RECORD/report.json (``report`` plus every problem) and RECORD/unusable.csv (one problem a row)."""
    rows = [asdict(p) for p in problems]
    write_atomic(record / "report.json", json.dumps({**report, "problems": rows}, indent=1, default=str).encode())
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=["kind", "task", "stem", "region", "label", "detail"])
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(record / "unusable.csv", text.getvalue().encode())


def _write_new_annotations(target: ImportTarget, images: list[ImportedImage], data: dict[str, Any]
                           ) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
    """Write every image's PNGs under free names and build the new JSON, checked; on any failure the PNGs
    written so far are removed. Returns (stem -> PNG name, new JSON, replaced entries)."""
    taken = {str(a.get("file_name")) for a in data.get("annotations", []) if isinstance(a, dict)}
    folders = [f for f in (target.panoptic_dir, target.semantic_dir) if f is not None]
    names: dict[str, str] = {}
    written: list[Path] = []
    try:
        for image in images:
            names[image.stem] = free_png_name(image.stem, taken, folders)
            taken.add(names[image.stem])
            written += write_label_pngs(target, image, names[image.stem])
        new, replaced = updated_json(data, images, names)
        check_json(target, new, list(names))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return names, new, replaced


def import_annotations(target: ImportTarget, images: list[ImportedImage], base: Partition | None,
                       overwrite: bool, problems: list[Problem], report: dict[str, Any]) -> dict[str, Any]:
    """Write ``images`` into the split and partition of ``target`` (see the module's docstring).

    ``report``: what to record about the import's source; the report written (with the record folder,
    the imported images and the partition) is returned. With no image to import, only the record is
    written, and the DataError names it."""
    refuse_partition(target, overwrite)
    record = new_record_dir(target.root, target.partition_dir.name)
    report = {**report, "record": str(record), "imported": []}
    if not images:
        write_report(record, report, problems)
        raise DataError(record / "unusable.csv", f"nothing to import: no task has a usable annotation "
                                                 f"({len(problems)} problem(s) listed here)")
    data = read_json(target.split.json_path)
    names, new, replaced = _write_new_annotations(target, images, data)
    originals = keep_replaced(record, target, replaced, target.split.categories)
    write_atomic(target.split.json_path, json.dumps(new).encode())
    for path in originals:
        path.unlink(missing_ok=True)
    partition = write_partition(target, record, partition_lines(target, base, names), overwrite)
    replaced_names = {Path(str(e["file_name"])).stem: str(a["file_name"])
                      for e, a in zip(replaced["images"], replaced["annotations"])}
    report["imported"] = [{"stem": i.stem, "task": i.task, "png": names[i.stem], "segments": len(i.segments),
                           "replaced": replaced_names.get(i.stem)} for i in images]
    report["partition_file"] = str(partition)
    write_report(record, report, problems)
    return report
