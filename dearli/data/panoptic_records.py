"""The records of a panoptic split: one image's (:class:`PanopticRecord`), and a split's in columns.

Kept as objects, a record per image with a :class:`SegmentInfo` per segment costs about 6 KB an image in a
Python process, and the driver, every Train worker and every teacher actor hold the train split.
:class:`RecordTable` keeps the same fields as a few strings an image and flat arrays of the segments
(``offsets[i]:offsets[i + 1]`` are image ``i``'s), and builds a record when one is asked for. It is a
read-only sequence of records (``table[i]``, ``len(table)``, iteration) that grows only by :meth:`append`.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    """One entry of ``segments_info``; ``category_id`` is the dataset id, ``label`` the training id."""

    id: int
    category_id: int
    label: int
    iscrowd: bool
    area: int
    bbox: tuple[float, float, float, float]  # x, y, width, height


@dataclass(frozen=True, slots=True)
class PanopticRecord:
    """One image of a split. ``panoptic_path`` is None for an image without annotation."""

    image_id: int | str
    stem: str
    image_path: Path
    panoptic_path: Path | None
    height: int
    width: int
    segments_info: tuple[SegmentInfo, ...] = ()
    semantic_path: Path | None = None


_SEGMENT_COLUMNS = {"seg_id": "q", "category_id": "q", "label": "q", "iscrowd": "b", "area": "q"}


class RecordTable(Sequence[PanopticRecord]):
    """Records in columns. Build with :meth:`append` (or :meth:`from_records`), then read by index."""

    def __init__(self) -> None:
        self.image_ids: list[int | str] = []
        self.stems: list[str] = []
        self._image_paths: list[str] = []
        self._panoptic_paths: list[str | None] = []
        self._semantic_paths: list[str | None] = []
        self._sizes = array("q")  # height, width, height, width, ...
        self._offsets = array("q", [0])
        self._segments = {name: array(code) for name, code in _SEGMENT_COLUMNS.items()}
        self._bbox = array("d")  # x, y, width, height per segment

    @classmethod
    def from_records(cls, records: Iterable[PanopticRecord]) -> RecordTable:
        table = cls()
        for record in records:
            table.append(record)
        return table

    def append(self, record: PanopticRecord) -> None:
        """Add one record at the end (its fields are copied into the columns)."""
        self.image_ids.append(record.image_id)
        self.stems.append(record.stem)
        self._image_paths.append(str(record.image_path))
        self._panoptic_paths.append(_text(record.panoptic_path))
        self._semantic_paths.append(_text(record.semantic_path))
        self._sizes.extend((record.height, record.width))
        for seg in record.segments_info:
            self._segments["seg_id"].append(seg.id)
            self._segments["category_id"].append(seg.category_id)
            self._segments["label"].append(seg.label)
            self._segments["iscrowd"].append(seg.iscrowd)
            self._segments["area"].append(seg.area)
            self._bbox.extend(seg.bbox)
        self._offsets.append(len(self._segments["seg_id"]))

    def take(self, indices: Iterable[int]) -> RecordTable:
        """A new table of the records at ``indices``, in that order (copied column by column)."""
        out, positions = RecordTable(), range(len(self))
        for index in indices:
            i = positions[index]  # negative counts from the end; out of range raises IndexError
            out.image_ids.append(self.image_ids[i])
            out.stems.append(self.stems[i])
            out._image_paths.append(self._image_paths[i])
            out._panoptic_paths.append(self._panoptic_paths[i])
            out._semantic_paths.append(self._semantic_paths[i])
            out._sizes.extend(self._sizes[2 * i:2 * i + 2])
            start, stop = self._offsets[i], self._offsets[i + 1]
            for name, column in self._segments.items():
                out._segments[name].extend(column[start:stop])
            out._bbox.extend(self._bbox[4 * start:4 * stop])
            out._offsets.append(len(out._segments["seg_id"]))
        return out

    def __len__(self) -> int:
        return len(self.stems)

    @overload
    def __getitem__(self, index: int) -> PanopticRecord: ...

    @overload
    def __getitem__(self, index: slice) -> list[PanopticRecord]: ...

    def __getitem__(self, index: int | slice) -> PanopticRecord | list[PanopticRecord]:
        if isinstance(index, slice):
            return [self._record(i) for i in range(len(self))[index]]
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        return self._record(index % len(self))

    def __iter__(self) -> Iterator[PanopticRecord]:
        return (self._record(i) for i in range(len(self)))

    def _record(self, i: int) -> PanopticRecord:
        start, stop = self._offsets[i], self._offsets[i + 1]
        columns = [self._segments[name][start:stop] for name in _SEGMENT_COLUMNS]
        flat = self._bbox[4 * start:4 * stop]
        boxes = [tuple(flat[k:k + 4]) for k in range(0, len(flat), 4)]
        segments = tuple(SegmentInfo(id=s, category_id=c, label=lab, iscrowd=bool(crowd), area=area, bbox=box)
                         for s, c, lab, crowd, area, box in zip(*columns, boxes))
        return PanopticRecord(image_id=self.image_ids[i], stem=self.stems[i], image_path=Path(self._image_paths[i]),
                              panoptic_path=_path(self._panoptic_paths[i]), height=self._sizes[2 * i],
                              width=self._sizes[2 * i + 1], segments_info=segments,
                              semantic_path=_path(self._semantic_paths[i]))


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _path(text: str | None) -> Path | None:
    return None if text is None else Path(text)
