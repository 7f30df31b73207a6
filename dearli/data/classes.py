"""Class definitions of the standard datasets, shipped as package data (dearli/data/classes/*.json).

- ``ade20k_150``: the 150 ADE20K panoptic categories (ids 0-149, 100 things / 50 stuff), names as the
  SceneParsing benchmark spells them (already synonym lists such as "building, edifice").
- ``coco_133``: the 133 COCO panoptic categories (80 things, 53 stuff) with their COCO ids.
- ``coco_objects_81``: "background" (id 0, stuff) + the 80 COCO things with their COCO ids.

``classes.json`` files of datasets use the same format: ``[{"id", "name", "isthing", "color"?}, ...]``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from dearli.data.panoptic import Category
from dearli.errors import DataError

CLASS_SETS = ("ade20k_150", "coco_133", "coco_objects_81")
BACKGROUND_NAME = "background"
BACKGROUND_ID = 0  # dataset id of the COCO-Objects background class (unused by COCO things)
_ADE_INSTANCE_FILE = "ade20k_instance_classes.json"


def _package_json(file_name: str) -> Any:
    with resources.files("dearli.data").joinpath("classes", file_name).open("r", encoding="utf-8") as f:
        return json.load(f)


def coco_objects_categories() -> list[Category]:
    """The 81 COCO-Objects classes: background (id 0) + the 80 COCO things (COCO ids)."""
    things = [c for c in load_class_names("coco_133") if c.isthing]
    return [Category(BACKGROUND_ID, BACKGROUND_NAME, False, (BACKGROUND_NAME,), (0, 0, 0))] + things


def load_class_names(name: str) -> list[Category]:
    """Categories of a standard class set (see ``CLASS_SETS``), sorted by dataset id."""
    if name == "coco_objects_81":
        return coco_objects_categories()
    if name not in CLASS_SETS:
        raise DataError(None, f"unknown class set '{name}' (known: {', '.join(CLASS_SETS)})")
    source = f"dearli/data/classes/{name}.json"
    return sorted((Category.from_dict(e, source) for e in _package_json(f"{name}.json")), key=lambda c: c.id)


def ade20k_instance_to_category() -> dict[int, int]:
    """ADE20K instance-challenge class (1-based R value of annotations_instance PNGs) -> ADE20K-150 id."""
    table = _package_json(_ADE_INSTANCE_FILE)["instance_to_category"]
    return {int(k): int(v) for k, v in table.items()}


def read_classes_json(path: str | Path) -> list[Category]:
    """Read a dataset's ``classes.json`` (DataError naming the file on any problem)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except FileNotFoundError:
        raise DataError(path, "classes file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(path, f"cannot parse JSON: {err}") from None
    if not isinstance(entries, list) or not entries:
        raise DataError(path, "must be a non-empty list of {id, name, isthing} objects")
    return [Category.from_dict(e, path) for e in entries]


def write_classes_json(path: str | Path, categories: list[Category]) -> None:
    """Write categories in the ``classes.json`` format, one per line."""
    rows = [json.dumps(c.to_dict()) for c in sorted(categories, key=lambda c: c.id)]
    Path(path).write_text("[\n  " + ",\n  ".join(rows) + "\n]\n", encoding="utf-8")
