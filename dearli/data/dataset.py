"""Dataset directories: ``dataset.yaml`` reading and writing, standard-layout detection.

``load_dataset(root)`` reads ``root/dataset.yaml`` (see the dataset layout contract). Without one, it
recognises the standard COCO panoptic layout (``annotations/panoptic_{train,val}2017.json``) and the
layout Mask2Former's ADE20K preparation leaves in ``ADEChallengeData2016``. Paths are relative to the
root (``..`` is allowed, so a prepared dataset can point at images it did not copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dearli.data.classes import (
    VOCABULARIES,
    apply_vocabulary,
    own_classes_file,
    read_classes_json,
    vocabulary_matches,
)
from dearli.data.panoptic import CategoryMap, PanopticSplit
from dearli.data.panoptic_json import read_split
from dearli.data.partitions import Partition, partition_names, read_partition
from dearli.errors import DataError

DATASET_FILE = "dataset.yaml"
_SPLIT_FIELDS = ("image_dir", "panoptic_json", "panoptic_dir", "semantic_dir")
_REQUIRED_SPLIT_FIELDS = _SPLIT_FIELDS[:3]


@dataclass(frozen=True)
class SplitSpec:
    """Where one split's files live (paths relative to the dataset root, or absolute)."""

    image_dir: str
    panoptic_json: str
    panoptic_dir: str
    semantic_dir: str | None = None

    def to_dict(self) -> dict[str, str]:
        out = {k: getattr(self, k) for k in _REQUIRED_SPLIT_FIELDS}
        if self.semantic_dir is not None:
            out["semantic_dir"] = self.semantic_dir
        return out


class DatasetInfo:
    """A dataset directory: its splits, categories and partitions. Splits are parsed once, on demand."""

    def __init__(self, root: str | Path, name: str, splits: dict[str, SplitSpec],
                 classes_file: str | None = None, partitions_dir: str | None = None,
                 source: Path | None = None, vocabulary: str | None = None):
        self.root = Path(root)
        self.name = name
        self.splits = dict(splits)
        self.classes_file = None if classes_file is None else self.root / classes_file
        self.partitions_dir = None if partitions_dir is None else self.root / partitions_dir
        self.source = source if source is not None else self.root / DATASET_FILE
        self.vocabulary = vocabulary  # shipped synonym lists for the classes (classes_file overrides them)
        self.strict_vocabulary = True  # False: use the vocabulary only if the classes are its benchmark's
        self._categories: CategoryMap | None = None
        self._cache: dict[str, PanopticSplit] = {}

    def __repr__(self) -> str:
        return f"DatasetInfo(root={str(self.root)!r}, name={self.name!r}, splits={list(self.splits)})"

    @property
    def split_names(self) -> list[str]:
        return list(self.splits)

    @property
    def categories(self) -> CategoryMap:
        """From ``classes.json`` when given, else from the first split's panoptic JSON (with the synonyms
        of the dataset's vocabulary, if it names one)."""
        if self._categories is None:
            if self.classes_file is not None:
                self._categories = CategoryMap(read_classes_json(self.classes_file), self.classes_file)
            else:
                self.split("train" if "train" in self.splits else next(iter(self.splits)))
        return self._categories

    def split(self, name: str, problems: list[DataError] | None = None) -> PanopticSplit:
        """The parsed split ``name``. With ``problems`` given, bad images are collected, not raised
        (and the result is not cached)."""
        if name not in self.splits:
            raise DataError(self.source, f"no split '{name}' (available: {', '.join(self.splits)})")
        if problems is None and name in self._cache:
            return self._cache[name]
        spec = self.splits[name]
        # Every split shares one category map: classes.json, else the first split parsed.
        cats = self.categories if self.classes_file is not None else self._categories
        split = read_split(
            self.root / spec.panoptic_json, self.root / spec.image_dir, self.root / spec.panoptic_dir,
            None if spec.semantic_dir is None else self.root / spec.semantic_dir,
            categories=cats, name=name, problems=problems)
        if self._categories is None:
            self._categories = split.categories
            if self.vocabulary is not None and (self.strict_vocabulary or
                                                vocabulary_matches(split.categories, self.vocabulary)):
                self._categories = split.categories = apply_vocabulary(split.categories, self.vocabulary,
                                                                       self.source)
        if problems is None:
            self._cache[name] = split
        return split

    def adopt_split(self, name: str, split: PanopticSplit) -> None:
        """Use ``split``, parsed elsewhere from this dataset (a Ray driver's), as split ``name``: the JSON is
        not parsed again here."""
        if name not in self.splits:
            raise DataError(self.source, f"no split '{name}' (available: {', '.join(self.splits)})")
        self._cache[name] = split
        if self._categories is None:
            self._categories = split.categories

    def partition_names(self) -> list[str]:
        return [] if self.partitions_dir is None else partition_names(self.partitions_dir)

    def partition(self, name: str) -> Partition:
        if self.partitions_dir is None:
            raise DataError(self.source, f"no 'partitions' directory configured (asked for '{name}')")
        return read_partition(self.partitions_dir, name)


def _field(data: dict[str, Any], key: str, where: str, source: Path, required: bool = True) -> str | None:
    value = data.get(key)
    if value is None:
        if required:
            raise DataError(source, f"missing field '{where}{key}'")
        return None
    if not isinstance(value, str) or not value:
        raise DataError(source, f"field '{where}{key}' must be a non-empty string, got {value!r}")
    return value


def _parse_split(name: str, entry: Any, root: Path, source: Path) -> SplitSpec:
    where = f"splits.{name}."
    if not isinstance(entry, dict):
        raise DataError(source, f"field 'splits.{name}' must be a mapping of {', '.join(_SPLIT_FIELDS)}")
    unknown = set(entry) - set(_SPLIT_FIELDS)
    if unknown:
        raise DataError(source, f"unknown field(s) {', '.join(f'{where}{k}' for k in sorted(unknown))}")
    values = {k: _field(entry, k, where, source, k in _REQUIRED_SPLIT_FIELDS) for k in _SPLIT_FIELDS}
    for key, value in values.items():
        if value is None:
            continue
        path = root / value
        if not (path.is_file() if key == "panoptic_json" else path.is_dir()):
            kind = "file" if key == "panoptic_json" else "directory"
            raise DataError(source, f"field '{where}{key}': {kind} {path} does not exist")
    return SplitSpec(**values)


def read_dataset_yaml(root: Path, source: Path) -> DatasetInfo:
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise DataError(source, f"cannot parse YAML: {err}") from None
    if not isinstance(data, dict):
        raise DataError(source, "must be a YAML mapping with 'name' and 'splits'")
    name = _field(data, "name", "", source, required=False) or root.name
    splits = data.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise DataError(source, "field 'splits' must be a non-empty mapping of split name -> paths")
    specs = {str(k): _parse_split(str(k), v, root, source) for k, v in splits.items()}
    classes = _field(data, "classes", "", source, required=False)
    if classes is not None and not (root / classes).is_file():
        raise DataError(source, f"field 'classes': file {root / classes} does not exist")
    partitions = _field(data, "partitions", "", source, required=False)
    if partitions is not None and not (root / partitions).is_dir():
        raise DataError(source, f"field 'partitions': directory {root / partitions} does not exist")
    vocabulary = _field(data, "vocabulary", "", source, required=False)
    if vocabulary is not None and vocabulary not in VOCABULARIES:
        raise DataError(source, f"field 'vocabulary': unknown vocabulary '{vocabulary}' "
                                f"(shipped: {', '.join(VOCABULARIES)})")
    return DatasetInfo(root, name, specs, classes, partitions, source, vocabulary)


def _first_dir(root: Path, *candidates: str) -> str | None:
    return next((c for c in candidates if (root / c).is_dir()), None)


def detect_layout(root: Path) -> DatasetInfo | None:
    """A DatasetInfo for a standard COCO panoptic or Mask2Former-ADE20K layout, or None. Its classes are
    named by the shipped COCO / ADE20K vocabulary when they are that benchmark's, or by the directory's
    classes.json if it has one."""
    specs: dict[str, SplitSpec] = {}
    for split in ("train", "val"):
        coco_json = f"annotations/panoptic_{split}2017.json"
        coco_png = _first_dir(root, f"panoptic_{split}2017", f"annotations/panoptic_{split}2017")
        if (root / coco_json).is_file() and coco_png and (root / f"{split}2017").is_dir():
            semantic = _first_dir(root, f"panoptic_semseg_{split}2017")
            specs[split] = SplitSpec(f"{split}2017", coco_json, coco_png, semantic)
            continue
        ade_dir = "training" if split == "train" else "validation"
        ade_json = f"ade20k_panoptic_{split}.json"
        if (root / ade_json).is_file() and (root / f"ade20k_panoptic_{split}").is_dir():
            semantic = _first_dir(root, f"annotations_detectron2/{ade_dir}")
            specs[split] = SplitSpec(f"images/{ade_dir}", ade_json, f"ade20k_panoptic_{split}", semantic)
    if not specs:
        return None
    name = "coco" if any(s.image_dir.endswith("2017") for s in specs.values()) else "ade20k"
    info = DatasetInfo(root, name, specs, own_classes_file(root), _first_dir(root, "partitions"), root,
                       "coco_panoptic" if name == "coco" else "ade20k_150")
    info.strict_vocabulary = False
    return info


def load_dataset(root: str | Path) -> DatasetInfo:
    """Open the dataset at ``root`` (a directory with ``dataset.yaml`` or a standard layout)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset directory does not exist")
    source = root / DATASET_FILE
    if source.is_file():
        return read_dataset_yaml(root, source)
    detected = detect_layout(root)
    if detected is None:
        raise DataError(source, "not found, and the directory is not a standard COCO panoptic layout "
                                "(annotations/panoptic_{train,val}2017.json + panoptic_{train,val}2017/ + "
                                "{train,val}2017/)")
    return detected


def write_dataset_yaml(root: str | Path, name: str, splits: dict[str, SplitSpec],
                       classes: str | None = None, partitions: str | None = None,
                       overwrite: bool = False, vocabulary: str | None = None) -> Path:
    """Write ``root/dataset.yaml``; refuses to replace an existing one unless ``overwrite``."""
    path = Path(root) / DATASET_FILE
    if path.exists() and not overwrite:
        raise DataError(path, "already exists (pass --overwrite to replace it)")
    data: dict[str, Any] = {"name": name}
    if classes is not None:
        data["classes"] = classes
    if vocabulary is not None:
        data["vocabulary"] = vocabulary
    data["splits"] = {k: v.to_dict() for k, v in splits.items()}
    if partitions is not None:
        data["partitions"] = partitions
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path
