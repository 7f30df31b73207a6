"""The class table of the synthetic world: thing classes are coloured shapes, stuff classes are textures.

Category ids are contiguous from 0 (things first, then stuff), so a category id is also the contiguous
training id and the value written into semantic PNGs. Names read as plain words because the text
encoder of the small CLIP is trained on captions of this world; the optional extra synonyms (after the
first comma) are for the text classifier, the first synonym is the display name.

The thing table is a sparse subset of shapes × colours on purpose: every colour is shared by at least
two shapes and every shape by at least two colours (circle, star, ...), so neither colour nor outline
alone identifies a class. Stuff colours are chosen close to thing colours (grass ~ green, water ~ blue,
brick wall ~ red/orange, sand ~ yellow) so a class cannot be read off mean colour either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Base RGB of each colour word; instances jitter around it (see world.py).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 40, 40),
    "orange": (235, 125, 30),
    "yellow": (225, 205, 45),
    "green": (45, 165, 65),
    "blue": (45, 75, 205),
    "purple": (135, 60, 180),
}

# Zipf exponent of the thing-class frequencies: with 14 classes the most frequent is ~11x the rarest.
THING_ZIPF_EXPONENT = 0.9


@dataclass(frozen=True)
class SynthClass:
    """One category of the world.

    Attributes:
        id: category id (contiguous from 0).
        names: display name first, then synonyms.
        isthing: countable object (True) or amorphous background (False).
        kind: shape name for things (see shapes.SHAPES), texture name for stuff (see textures.TEXTURES).
        rgb: reference colour (instances/regions jitter around it); also used as a visualisation colour.
        weight: relative sampling frequency among classes of the same kind (thing or stuff).
    """

    id: int
    names: tuple[str, ...]
    isthing: bool
    kind: str
    rgb: tuple[int, int, int]
    weight: float

    @property
    def name(self) -> str:
        return self.names[0]


# (shape, colour, extra synonyms) in decreasing frequency: rank r gets weight 1 / (r + 1) ** exponent.
# Common and rare classes share colours and shapes (blue square common, purple square rare) so the
# long tail is not learnable from one attribute.
_THINGS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("circle", "red", ("red disk",)),
    ("square", "blue", ("blue box",)),
    ("triangle", "green", ()),
    ("star", "yellow", ()),
    ("circle", "green", ("green disk",)),
    ("triangle", "red", ()),
    ("star", "blue", ()),
    ("cross", "orange", ("orange plus sign",)),
    ("diamond", "yellow", ("yellow rhombus",)),
    ("bar", "blue", ("blue stick",)),
    ("square", "purple", ("purple box",)),
    ("ring", "red", ("red donut",)),
    ("star", "orange", ()),
    ("diamond", "purple", ("purple rhombus",)),
)

# (texture, names, reference colour, weight). Sky is drawn as the top region when present (see scene.py).
_STUFF: tuple[tuple[str, tuple[str, ...], tuple[int, int, int], float], ...] = (
    ("sky", ("sky",), (140, 190, 235), 1.0),
    ("grass", ("grass", "lawn"), (70, 140, 55), 0.9),
    ("water", ("water", "sea"), (45, 95, 160), 0.7),
    ("sand", ("sand", "beach"), (210, 190, 135), 0.55),
    ("brick", ("brick wall", "bricks"), (165, 75, 55), 0.45),
    ("gravel", ("gravel", "pebbles"), (125, 125, 120), 0.35),
)


def _build_classes() -> tuple[SynthClass, ...]:
    classes = []
    for rank, (shape, colour, synonyms) in enumerate(_THINGS):
        weight = 1.0 / (rank + 1) ** THING_ZIPF_EXPONENT
        classes.append(SynthClass(len(classes), (f"{colour} {shape}",) + synonyms, True, shape,
                                  COLOURS[colour], weight))
    for texture, names, rgb, weight in _STUFF:
        classes.append(SynthClass(len(classes), names, False, texture, rgb, weight))
    return tuple(classes)


CLASSES: tuple[SynthClass, ...] = _build_classes()
THING_CLASSES: tuple[SynthClass, ...] = tuple(c for c in CLASSES if c.isthing)
STUFF_CLASSES: tuple[SynthClass, ...] = tuple(c for c in CLASSES if not c.isthing)
NUM_CLASSES = len(CLASSES)


def class_probabilities(classes: tuple[SynthClass, ...]) -> np.ndarray:
    """Sampling probabilities (sum 1) of ``classes`` from their weights, shape len(classes)."""
    weights = np.array([c.weight for c in classes], dtype=np.float64)
    return weights / weights.sum()


def coco_categories() -> list[dict]:
    """Categories for the panoptic JSON: id, name (display name), isthing (0/1), color, supercategory."""
    return [
        {"id": c.id, "name": c.name, "isthing": int(c.isthing), "color": list(c.rgb),
         "supercategory": c.kind if c.isthing else "background"}
        for c in CLASSES
    ]


def classes_json() -> list[dict]:
    """Entries of ``classes.json``: id, comma-separated synonyms (display name first), isthing (bool)."""
    return [{"id": c.id, "name": ",".join(c.names), "isthing": c.isthing} for c in CLASSES]
