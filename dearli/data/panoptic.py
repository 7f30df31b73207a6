"""COCO panoptic reading: categories, records, per-image targets.

A split is one panoptic JSON plus its PNG directory and image directory. The JSON is parsed once
when the split is built; images and PNGs are read on every ``load_*`` call, so a split is cheap to
hold in DataLoader workers. Every problem with the files raises :class:`DataError` naming the file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dearli.data.coco_format import VOID_ID, rgb2id
from dearli.data.panoptic_records import PanopticRecord, RecordTable
from dearli.errors import DataError


def parse_synonyms(name: str) -> tuple[str, ...]:
    """Split a comma-separated class name ("person, child,girl") into stripped, non-empty synonyms."""
    return tuple(part.strip() for part in name.split(",") if part.strip())


@dataclass(frozen=True)
class Category:
    """One dataset category. ``name`` is the display name (first synonym)."""

    id: int
    name: str
    isthing: bool
    synonyms: tuple[str, ...]
    color: tuple[int, int, int] | None = None

    @classmethod
    def from_dict(cls, entry: Any, source: str | Path) -> Category:
        """Build from a COCO-style ``{"id", "name", "isthing", "color"?}`` dict read from ``source``."""
        if not isinstance(entry, dict):
            raise DataError(source, f"category entry must be an object, got {entry!r}")
        for key in ("id", "name"):
            if key not in entry:
                raise DataError(source, f"category {entry!r} has no '{key}'")
        cat_id, name = entry["id"], entry["name"]
        if isinstance(cat_id, bool) or not isinstance(cat_id, int):
            raise DataError(source, f"category id must be an integer, got {cat_id!r}")
        synonyms = parse_synonyms(name) if isinstance(name, str) else ()
        if not synonyms:
            raise DataError(source, f"category {cat_id} has an empty or non-string name {name!r}")
        isthing = entry.get("isthing", 0)
        if isthing not in (0, 1, True, False):
            raise DataError(source, f"category {cat_id}: 'isthing' must be 0/1 or a boolean, got {isthing!r}")
        color = entry.get("color")
        color = tuple(int(c) for c in color) if isinstance(color, (list, tuple)) and len(color) == 3 else None
        return cls(cat_id, synonyms[0], bool(isthing), synonyms, color)

    def to_dict(self) -> dict[str, Any]:
        """COCO-style dict; the name carries all synonyms comma-separated."""
        out: dict[str, Any] = {"id": self.id, "name": ", ".join(self.synonyms), "isthing": int(self.isthing)}
        if self.color is not None:
            out["color"] = list(self.color)
        return out


class CategoryMap:
    """Dataset category ids (possibly non-contiguous, possibly starting at 0) <-> training ids 0..K-1.

    Training ids follow the order of the categories sorted by dataset id.
    """

    def __init__(self, categories: Iterable[Category], source: str | Path | None = None):
        self.categories: list[Category] = sorted(categories, key=lambda c: c.id)
        if not self.categories:
            raise DataError(source, "no categories defined")
        self._to_contiguous: dict[int, int] = {}
        for index, cat in enumerate(self.categories):
            if cat.id in self._to_contiguous:
                raise DataError(source, f"category id {cat.id} is defined twice")
            self._to_contiguous[cat.id] = index

    @classmethod
    def from_dicts(cls, entries: Any, source: str | Path) -> CategoryMap:
        if not isinstance(entries, list):
            raise DataError(source, "'categories' must be a list")
        return cls([Category.from_dict(e, source) for e in entries], source)

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def names(self) -> list[str]:
        """Display names (first synonym), indexed by training id."""
        return [c.name for c in self.categories]

    @property
    def synonyms(self) -> list[tuple[str, ...]]:
        """All synonyms of each class, indexed by training id."""
        return [c.synonyms for c in self.categories]

    @property
    def thing_ids(self) -> tuple[int, ...]:
        """Training ids of the thing classes."""
        return tuple(i for i, c in enumerate(self.categories) if c.isthing)

    @property
    def stuff_ids(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.categories) if not c.isthing)

    @property
    def dataset_ids(self) -> tuple[int, ...]:
        """Dataset category ids, indexed by training id."""
        return tuple(c.id for c in self.categories)

    def __contains__(self, dataset_id: object) -> bool:
        return dataset_id in self._to_contiguous

    def __len__(self) -> int:
        return len(self.categories)

    def to_contiguous(self, dataset_id: int) -> int:
        """Training id of a dataset category id (KeyError if unknown)."""
        try:
            return self._to_contiguous[int(dataset_id)]
        except KeyError:
            raise KeyError(f"unknown category id {dataset_id}") from None

    def to_dataset_id(self, contiguous: int) -> int:
        """Dataset category id of a training id (IndexError if out of range)."""
        if not 0 <= int(contiguous) < len(self.categories):
            raise IndexError(f"training id {contiguous} outside 0..{len(self.categories) - 1}")
        return self.categories[int(contiguous)].id

    def category(self, dataset_id: int) -> Category:
        return self.categories[self.to_contiguous(dataset_id)]


@dataclass(frozen=True)
class PanopticTarget:
    """Decoded panoptic ground truth of one image.

    segment_map: H×W int64 segment ids (0 = VOID); segment_ids: N int64; labels: N int64 training ids;
    iscrowd: N bool; masks: N×H×W bool (masks[i] = segment_map == segment_ids[i]).
    """

    segment_map: np.ndarray
    segment_ids: np.ndarray
    labels: np.ndarray
    iscrowd: np.ndarray
    masks: np.ndarray


def _open_rgb(path: Path, what: str) -> np.ndarray:
    """Read an image file fully as H×W×3 uint8, turning every failure into a DataError naming the file."""
    if not path.is_file():
        raise DataError(path, f"{what} not found")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: truncated files only fail here
            # np.array (not asarray): callers may augment in place. EXIF orientation is not applied.
            return np.array(img.convert("RGB"))  # grey/CMYK/palette -> RGB
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(path, f"cannot read {what}: {err}") from None


def _check_size(path: Path, array: np.ndarray, record: PanopticRecord, what: str) -> None:
    if array.shape[:2] != (record.height, record.width):
        raise DataError(path, f"{what} is {array.shape[1]}x{array.shape[0]} (WxH) but the panoptic JSON "
                              f"says {record.width}x{record.height}")


def read_segment_map(record: PanopticRecord, json_path: str | Path) -> np.ndarray:
    """Decode a record's panoptic PNG (H×W int64) and check it against the record's ``segments_info``:
    same size as the image, no segment id missing from either side."""
    if record.panoptic_path is None:
        raise DataError(json_path, f"image '{record.stem}' has no panoptic annotation")
    png = record.panoptic_path
    segment_map = rgb2id(_open_rgb(png, "panoptic PNG"))
    _check_size(png, segment_map, record, "panoptic PNG")
    present = set(np.unique(segment_map).tolist()) - {VOID_ID}
    listed = {seg.id for seg in record.segments_info}
    if present - listed:
        raise DataError(png, f"segment ids {sorted(present - listed)} are in the PNG but not in the "
                             f"segments_info of {json_path}")
    if listed - present:
        raise DataError(png, f"segment ids {sorted(listed - present)} of {json_path} have no pixel in the PNG")
    return segment_map


@dataclass
class PanopticSplit:
    """The records of one split plus the category map used to label them. ``records`` may be given as any
    sequence of records; the split keeps them in columns (:class:`RecordTable`)."""

    name: str
    json_path: Path
    categories: CategoryMap
    records: Sequence[PanopticRecord]
    _by_stem: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.records, RecordTable):
            self.records = RecordTable.from_records(self.records)
        if not self._by_stem:
            self._by_stem = {stem: i for i, stem in enumerate(self.records.stems)}

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled (e.g. into Ray's object store) without the stem index, which unpickling rebuilds.
        return PanopticSplit, (self.name, self.json_path, self.categories, self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    @property
    def stems(self) -> list[str]:
        return list(self._table.stems)

    @property
    def _table(self) -> RecordTable:
        assert isinstance(self.records, RecordTable)  # __post_init__ made it one
        return self.records

    def has(self, stem: str) -> bool:
        return stem in self._by_stem

    def record(self, stem: str) -> PanopticRecord:
        """The record whose image file stem is ``stem`` (DataError if absent)."""
        if stem not in self._by_stem:
            raise DataError(self.json_path, f"no image with stem '{stem}' in split '{self.name}'")
        return self.records[self._by_stem[stem]]

    def subset(self, stems: Sequence[str] | Any) -> PanopticSplit:
        """A split restricted to ``stems`` in their order.

        ``stems`` may be a :class:`~dearli.data.partitions.Partition`; a stem missing from the split then
        raises a DataError naming the partition file and line.
        """
        path, lines = getattr(stems, "path", None), getattr(stems, "line_numbers", None)
        names = tuple(getattr(stems, "labeled", stems))
        indices = []
        for index, stem in enumerate(names):
            if stem not in self._by_stem:
                if path is not None and lines is not None:
                    raise DataError(path, f"line {lines[index]}: image '{stem}' is not in split "
                                          f"'{self.name}' ({self.json_path})")
                raise DataError(self.json_path, f"no image with stem '{stem}' in split '{self.name}'")
            indices.append(self._by_stem[stem])
        return PanopticSplit(self.name, self.json_path, self.categories, self._table.take(indices))

    def exclude(self, stems: Iterable[str]) -> PanopticSplit:
        """A split without ``stems`` (order kept); used for the unlabeled part of a partition."""
        drop = set(stems)
        kept = (i for i, stem in enumerate(self._table.stems) if stem not in drop)
        return PanopticSplit(self.name, self.json_path, self.categories, self._table.take(kept))

    def load_image(self, record: PanopticRecord) -> np.ndarray:
        """H×W×3 uint8 RGB image; DataError if unreadable, truncated or not the JSON's size."""
        image = _open_rgb(record.image_path, "image")
        _check_size(record.image_path, image, record, "image")
        return image

    def load_segment_map(self, record: PanopticRecord) -> np.ndarray:
        """H×W int64 segment ids of the panoptic PNG, checked against ``segments_info``."""
        return read_segment_map(record, self.json_path)

    def load_target(self, record: PanopticRecord) -> PanopticTarget:
        """Decoded target (see :class:`PanopticTarget`); DataError on any mismatch with the JSON."""
        segment_map = self.load_segment_map(record)
        segs = record.segments_info
        segment_ids = np.array([s.id for s in segs], dtype=np.int64)
        return PanopticTarget(
            segment_map=segment_map,
            segment_ids=segment_ids,
            labels=np.array([s.label for s in segs], dtype=np.int64),
            iscrowd=np.array([s.iscrowd for s in segs], dtype=bool),
            masks=segment_map[None] == segment_ids[:, None, None],
        )

    def load_semantic(self, record: PanopticRecord) -> np.ndarray:
        """H×W uint8 semantic map (training ids, 255 = ignore) from the split's semantic PNGs."""
        path = record.semantic_path
        if path is None:
            raise DataError(self.json_path, f"split '{self.name}' has no semantic_dir")
        if not path.is_file():
            raise DataError(path, "semantic PNG not found")
        try:
            with Image.open(path) as img:
                img.load()
                semantic = np.array(img)
        except (OSError, SyntaxError, ValueError) as err:
            raise DataError(path, f"cannot read semantic PNG: {err}") from None
        if semantic.ndim != 2 or semantic.dtype != np.uint8:
            raise DataError(path, f"semantic PNG must be single-channel 8-bit, got shape {semantic.shape} "
                                  f"{semantic.dtype}")
        _check_size(path, semantic, record, "semantic PNG")
        return semantic
