"""Class definitions of the standard datasets, shipped as package data (dearli/data/classes/*.json).

- ``ade20k_150``: the 150 ADE20K panoptic categories (ids 0-149, 100 things / 50 stuff), names as the
  SceneParsing benchmark spells them (already synonym lists such as "building, edifice").
- ``coco_133``: the 133 COCO panoptic categories (80 things, 53 stuff) with their COCO ids.
- ``coco_objects_81``: "background" (id 0, stuff) + the 80 COCO things with their COCO ids.

``classes.json`` files of datasets use the same format: ``[{"id", "name", "isthing", "color"?}, ...]``.

Vocabularies (``dearli/data/classes/vocab/*.txt``, upstream data, see NOTICE.md there) are the
prompt-engineered synonym lists the official DEARLi / FC-CLIP code classifies with, e.g.
``wall,walls,brick wall,stone wall,interior wall`` for ADE20K's ``wall``, ``wall,walls`` for COCO's
``wall-other-merged``. A dataset whose
``dataset.yaml`` names one (``vocabulary: ade20k_150``) keeps its category ids, kinds and display names
and takes the vocabulary's synonyms as the class text; a ``classes:`` file of the dataset overrides it.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any

from dearli.data.panoptic import Category, CategoryMap, parse_synonyms
from dearli.errors import DataError

CLASS_SETS = ("ade20k_150", "coco_133", "coco_objects_81")
BACKGROUND_NAME = "background"
BACKGROUND_ID = 0  # dataset id of the COCO-Objects background class (unused by COCO things)
_ADE_INSTANCE_FILE = "ade20k_instance_classes.json"
# Shipped vocabularies: name -> (file under classes/vocab/, id offset, class set it names). Line id i names
# category i - offset: the ADE20K list counts from 1 (its line 0 is unused), the COCO lists use the COCO ids.
VOCABULARIES: dict[str, tuple[str, int, str]] = {
    "ade20k_150": ("ade20k_150.txt", 1, "ade20k_150"),
    "coco_panoptic": ("coco_panoptic.txt", 0, "coco_133"),
    "coco_objects": ("coco_objects.txt", 0, "coco_objects_81"),
}
_UNUSED_ID = "invalid_class_id"  # placeholder line of an id the dataset does not use
CLASSES_FILE = "classes.json"  # a user's class names beside dataset.yaml; they override the vocabulary


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


def own_classes_file(root: str | Path) -> str | None:
    """``"classes.json"`` when the dataset directory ``root`` has one (a user's class names), else None."""
    return CLASSES_FILE if (Path(root) / CLASSES_FILE).is_file() else None


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


def parse_vocabulary(text: str, source: str | Path, offset: int = 0) -> dict[int, tuple[str, ...]]:
    """``ID:name,synonym,...`` lines -> {dataset category id (ID - offset): synonyms}.

    Blank lines and ``invalid_class_id`` placeholders are skipped; a malformed line or a repeated id is a
    DataError naming ``source`` and the line.
    """
    vocabulary: dict[int, tuple[str, ...]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        raw_id, sep, names = line.partition(":")
        synonyms = parse_synonyms(names)
        if not sep or not raw_id.strip().isdigit() or not synonyms:
            raise DataError(source, f"line {number}: expected 'ID:name,synonym,...', got {line!r}")
        if synonyms == (_UNUSED_ID,):
            continue
        category_id = int(raw_id) - offset
        if category_id in vocabulary:
            raise DataError(source, f"line {number}: id {raw_id.strip()} is listed twice")
        vocabulary[category_id] = synonyms
    return vocabulary


def load_vocabulary(name: str) -> dict[int, tuple[str, ...]]:
    """The shipped vocabulary ``name`` (see ``VOCABULARIES``): {dataset category id: synonyms}."""
    if name not in VOCABULARIES:
        raise DataError(None, f"unknown vocabulary '{name}' (known: {', '.join(VOCABULARIES)})")
    return dict(_read_vocabulary(name))


@functools.cache
def _read_vocabulary(name: str) -> dict[int, tuple[str, ...]]:
    file_name, offset, _ = VOCABULARIES[name]
    text = resources.files("dearli.data").joinpath("classes", "vocab", file_name).read_text(encoding="utf-8")
    return parse_vocabulary(text, f"dearli/data/classes/vocab/{file_name}", offset)


def apply_vocabulary(categories: CategoryMap, name: str, source: str | Path | None) -> CategoryMap:
    """``categories`` with the synonyms of vocabulary ``name``; ids, kinds, display names and colours stay.

    Every category needs an entry: a missing one is a DataError naming ``source`` (the dataset.yaml).
    """
    vocabulary = load_vocabulary(name)
    renamed: list[Category] = []
    for cat in categories.categories:
        if cat.id not in vocabulary:
            raise DataError(source, f"category {cat.id} ('{cat.name}') has no entry in the '{name}' vocabulary; "
                                    "name its classes in a classes.json ('classes:') or drop 'vocabulary:'")
        renamed.append(Category(cat.id, cat.name, cat.isthing, vocabulary[cat.id], cat.color))
    return CategoryMap(renamed, source)


def vocabulary_matches(categories: CategoryMap, name: str) -> bool:
    """Whether ``categories`` are (a subset of) the classes vocabulary ``name`` was made for: every id is in
    the vocabulary and every display name is one of its synonyms or the benchmark's name for that id.

    A dataset found by its standard layout alone (no dataset.yaml) gets the vocabulary only then, so a
    custom dataset stored in COCO's layout keeps its own names.
    """
    vocabulary = load_vocabulary(name)
    standard = {c.id: set(c.synonyms) for c in load_class_names(VOCABULARIES[name][2])}
    return all(c.id in vocabulary and (c.name in vocabulary[c.id] or c.name in standard.get(c.id, ()))
               for c in categories.categories)
