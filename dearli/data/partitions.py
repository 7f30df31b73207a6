"""Semi-supervised partitions in the UniMatch/SemiVL text format.

A partition file lists one labeled image per line as ``image_path mask_path`` (paths relative to the
dataset root). Only the image STEM identifies the sample, so lists written for another directory
layout (``images/training/ADE_train_00001609.jpg`` or ``train2017/000000177254.jpg``) still apply.
Blank lines are ignored and the last line may lack its newline. The unlabeled set is every image of
the train split that the file does not list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from dearli.errors import DataError

if TYPE_CHECKING:
    from dearli.data.panoptic import PanopticSplit

LABELED_FILE = "labeled.txt"
VAL_FILE = "val.txt"


@dataclass(frozen=True)
class Partition:
    """The labeled stems of a partition, with the file and line each came from (for error messages)."""

    name: str
    labeled: tuple[str, ...]
    path: Path | None = None
    line_numbers: tuple[int, ...] = ()
    val: tuple[str, ...] | None = None  # optional evaluation list shipped with the partition

    def __len__(self) -> int:
        return len(self.labeled)

    def missing(self, split: PanopticSplit) -> list[tuple[int, str]]:
        """(line number, stem) of every listed image absent from ``split``."""
        lines = self.line_numbers or tuple(range(1, len(self.labeled) + 1))
        return [(line, stem) for line, stem in zip(lines, self.labeled) if not split.has(stem)]

    def labeled_split(self, split: PanopticSplit) -> PanopticSplit:
        """The listed images of ``split``, in file order (DataError naming file + line if one is absent)."""
        return split.subset(self)

    def unlabeled_split(self, split: PanopticSplit) -> PanopticSplit:
        """Every image of ``split`` that the partition does not list."""
        return split.exclude(self.labeled)

    def unlabeled(self, split: PanopticSplit) -> tuple[str, ...]:
        return tuple(self.unlabeled_split(split).stems)


def stem_of(image_path: str) -> str:
    """Sample identifier of a partition entry: the file name without extension."""
    return PurePosixPath(image_path.replace("\\", "/")).stem


def _parse_lines(path: Path) -> tuple[list[str], list[int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(path, "partition file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(path, f"cannot read partition file: {err}") from None
    stems: list[str] = []
    lines: list[int] = []
    first_seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) > 2:
            raise DataError(path, f"line {number}: expected 'image_path mask_path', got {len(fields)} fields: "
                                  f"{line.strip()[:120]!r}")
        stem = stem_of(fields[0])
        if not stem:
            raise DataError(path, f"line {number}: cannot take an image name from {fields[0]!r}")
        if stem in first_seen:
            raise DataError(path, f"line {number}: image '{stem}' is already listed on line {first_seen[stem]}")
        first_seen[stem] = number
        stems.append(stem)
        lines.append(number)
    return stems, lines


def read_stem_list(path: str | Path) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Stems and their 1-based line numbers from a partition-format file (DataError if empty)."""
    path = Path(path)
    stems, lines = _parse_lines(path)
    if not stems:
        raise DataError(path, "partition file lists no image")
    return tuple(stems), tuple(lines)


def read_partition_file(path: str | Path, name: str | None = None,
                        val_path: str | Path | None = None) -> Partition:
    """Read a ``labeled.txt``; ``name`` defaults to its directory name."""
    path = Path(path)
    stems, lines = read_stem_list(path)
    val = read_stem_list(val_path)[0] if val_path is not None else None
    return Partition(name or path.parent.name, stems, path, lines, val)


def read_partition(partitions_dir: str | Path, name: str) -> Partition:
    """Partition ``name`` from ``partitions_dir/<name>/labeled.txt``.

    Its evaluation list is ``<name>/val.txt`` or else a shared ``partitions_dir/val.txt`` (optional).
    """
    root = Path(partitions_dir)
    path = root / name / LABELED_FILE
    if not path.is_file():
        known = ", ".join(partition_names(root)) or "none"
        raise DataError(path, f"partition '{name}' not found (available: {known})")
    val_path = next((p for p in (root / name / VAL_FILE, root / VAL_FILE) if p.is_file()), None)
    return read_partition_file(path, name, val_path)


def _natural_key(name: str) -> list[object]:
    # "1_8" < "1_16" < "1_128": compare digit runs as numbers.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def partition_names(partitions_dir: str | Path) -> list[str]:
    """Names of the sub-directories holding a ``labeled.txt``, in natural order."""
    root = Path(partitions_dir)
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if (p / LABELED_FILE).is_file()]
    return sorted(names, key=_natural_key)
