"""Image–caption pairs for CLIP pre-training, drawn from the synthetic world's "pretrain" stream.

Each pair is either a whole scene with its caption or a square crop centred on one thing instance,
resized to the training resolution, whose caption names what is visible in the crop. Crops do three
jobs the raw stream cannot: they make objects large enough for a stride-32 trunk to see their outline,
they put the object's own name at the head of a short caption (so the text has to tell shapes apart),
and their target instance is chosen with weight 1 / class frequency, so tail classes are seen about as
often as head classes. Captions sometimes use a class's synonyms and a prompt-like prefix so the text
tower learns every name the classifier embeds, not only the display names.

Pairs come in groups of two from one scene (group g uses pretrain scene g): a minimal pair, or two views
of the scene. A pair depends only on (seed, its index, options), never on the batch it lands in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dearli.data.synth.captions import count_phrase, make_caption, plural
from dearli.data.synth.classes import CLASSES, THING_CLASSES, class_probabilities
from dearli.data.synth.world import MIN_THING_AREA, SynthSample, SynthWorld
from dearli.errors import ConfigError
from dearli.pretrain.paste import minimal_pair

PAIRS_VERSION = 2  # bump when a change here changes the pairs drawn for the same options
STREAM = "pretrain"
_CROP_SEED_TAG = 31  # separates the crop/caption randomness from the scene's own generator
_PASTE_SEED_TAG = 37  # ... and the minimal pairs' (this tag and the next two)
GROUP_SIZE = 2  # pairs drawn from one rendered scene
# Words that lead a caption now and then, so prompt templates ("a photo of a ...") are not unseen text.
PREFIXES = ("a photo of", "a picture of", "there is", "this is", "an image of")
MIN_STUFF_SHARE = 0.03  # a stuff region is named in a crop caption if it covers this share of the crop


@dataclass(frozen=True)
class PairOptions:
    """How pairs are drawn (every field changes the pairs, so all of them enter the checkpoint's hash).

    image_size: side of the square training images, pixels.
    paste_prob: share of pairs that are minimal pairs (two scenes differing in one painted object).
    crop_prob: share of the other pairs that are object-centred crops (the rest are whole scenes).
    context: (min, max) crop side as a multiple of the target instance's larger box side.
    scene_min_side: scene pairs show a random square window of at least this many scene pixels (0 = the
        whole scene); with ``image_size`` this sets the scale at which the CLIP sees whole scenes.
    min_crop: smallest crop side in scene pixels (tiny instances keep some surroundings).
    visible_share: a thing is named in a crop caption when this share of its pixels lies inside.
    focus_prob: chance that a crop's caption names only the object it is centred on ("a red circle"), as
        a label-like web caption does; these pairs match the oracle, which pools the features of one mask.
    synonym_prob: chance that a class is named by a random one of its names instead of the display name.
    prefix_prob: chance that a caption starts with one of PREFIXES.
    balance: the crop's target instance is chosen with weight (class frequency) ** -balance; 0 picks
        uniformly among the instances (head classes dominate), 1.5 makes the targets' classes roughly uniform.
    """

    image_size: int = 64
    paste_prob: float = 0.5
    crop_prob: float = 0.6
    context: tuple[float, float] = (1.2, 3.0)
    scene_min_side: int = 64
    min_crop: int = 24
    visible_share: float = 0.4
    focus_prob: float = 0.5
    synonym_prob: float = 0.3
    prefix_prob: float = 0.3
    balance: float = 1.5

    def validate(self) -> None:
        if not 32 <= self.image_size <= 1024:
            raise ConfigError(f"dearli pretrain-clip: image_size must lie in [32, 1024], got {self.image_size}")
        for name in ("paste_prob", "crop_prob", "focus_prob", "visible_share", "synonym_prob", "prefix_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"dearli pretrain-clip: {name} must lie in [0, 1], got {getattr(self, name)}")
        if self.balance < 0:
            raise ConfigError(f"dearli pretrain-clip: balance must be >= 0, got {self.balance}")
        if not 1.0 <= self.context[0] <= self.context[1]:
            raise ConfigError(f"dearli pretrain-clip: context must satisfy 1 <= min <= max, got {self.context}")


_THING_FREQUENCY = dict(zip((c.id for c in THING_CLASSES), class_probabilities(THING_CLASSES)))


def reword(rng: np.random.Generator, caption: str, class_ids: set[int], options: PairOptions) -> str:
    """Replace display names by random synonyms (singular and plural) and maybe add a prefix.

    Draws the same number of random values whatever the caption, so two pairs sharing a generator state
    (a minimal pair) get the same prefix and the same synonym choices.
    """
    use_synonym = rng.random(len(CLASSES)) < options.synonym_prob
    pick = rng.integers(0, 1 << 30, len(CLASSES))
    prefix = PREFIXES[int(rng.integers(len(PREFIXES)))] if rng.random() < options.prefix_prob else ""
    # Longest names first so a name is never replaced inside a longer one.
    for class_id in sorted(class_ids, key=lambda c: -len(CLASSES[c].name)):
        names = CLASSES[class_id].names
        other = names[pick[class_id] % len(names)] if use_synonym[class_id] else names[0]
        if other != names[0]:
            caption = caption.replace(plural(names[0]), plural(other)).replace(names[0], other)
    return f"{prefix} {caption}" if prefix else caption


def pick_instance(rng: np.random.Generator, sample: SynthSample, balance: float) -> dict | None:
    """A non-crowd thing segment of ``sample``, rarer classes favoured (see PairOptions.balance)."""
    things = [s for s in sample.segments if CLASSES[s["category_id"]].isthing and not s["iscrowd"]]
    if not things:
        return None
    weights = np.array([_THING_FREQUENCY[s["category_id"]] ** -balance for s in things])
    return things[int(rng.choice(len(things), p=weights / weights.sum()))]


def crop_window(rng: np.random.Generator, bbox: list[int], size: tuple[int, int], options: PairOptions
                ) -> tuple[int, int, int]:
    """(top, left, side) of a square crop around ``bbox`` [x, y, w, h], jittered, inside the image."""
    height, width = size
    x, y, w, h = bbox
    side = max(w, h) * rng.uniform(*options.context)
    side = int(round(min(max(side, options.min_crop), height, width)))
    cy = y + h / 2 + rng.uniform(-0.15, 0.15) * side
    cx = x + w / 2 + rng.uniform(-0.15, 0.15) * side
    top = int(np.clip(round(cy - side / 2), 0, height - side))
    left = int(np.clip(round(cx - side / 2), 0, width - side))
    return top, left, side


def crop_segments(sample: SynthSample, top: int, left: int, side: int, visible_share: float
                  ) -> tuple[list[dict], list[int]]:
    """Segments worth naming inside a crop, and the stuff ids ordered top to bottom.

    A thing (or crowd) counts when ``visible_share`` of it, and at least MIN_THING_AREA pixels, are
    inside; a stuff region when it covers MIN_STUFF_SHARE of the crop.
    """
    window = sample.segment_map[top:top + side, left:left + side]
    inside = np.bincount(window.ravel(), minlength=len(sample.segments) + 1)
    kept, stuff_rows = [], []
    for seg in sample.segments:
        area = int(inside[seg["id"]])
        if CLASSES[seg["category_id"]].isthing:
            if area >= max(MIN_THING_AREA, visible_share * seg["area"]):
                kept.append(seg)
        elif area >= MIN_STUFF_SHARE * side * side:
            kept.append(seg)
            stuff_rows.append((float(np.nonzero(window == seg["id"])[0].mean()), seg["category_id"]))
    return kept, [c for _, c in sorted(stuff_rows)]


def _resize(image: np.ndarray, top: int, left: int, side: int, out: int) -> torch.Tensor:
    """Crop of an H×W×3 uint8 image -> 3×out×out float in [0, 255] (antialiased bilinear)."""
    crop = image[top:top + side, left:left + side].transpose(2, 0, 1).astype(np.float32)
    x = torch.from_numpy(crop)[None]
    if side != out:
        x = F.interpolate(x, size=(out, out), mode="bilinear", align_corners=False, antialias=side > out)
    return x[0].clamp_(0.0, 255.0)  # interpolation overshoots a little at sharp edges


def _caption_window(rng: np.random.Generator, sample: SynthSample, window: tuple[int, int, int] | None,
                    options: PairOptions, target: dict | None = None) -> tuple[torch.Tensor, str]:
    """The (possibly cropped, resized, mirrored) image and reworded caption of ``sample`` in ``window``.

    With a ``target`` segment, the caption names only it with probability ``focus_prob``.
    """
    height, width = sample.segment_map.shape
    if window is None:  # the whole scene (its centred square if the world is not square)
        side = min(height, width)
        window = ((height - side) // 2, (width - side) // 2, side)
    top, left, side = window
    if target is not None and rng.random() < options.focus_prob:
        caption, present = count_phrase(1, CLASSES[target["category_id"]].name), {target["category_id"]}
    elif side == height == width and sample.caption:
        caption, present = sample.caption, sample.category_ids
    else:
        segments, order = crop_segments(sample, top, left, side, options.visible_share)
        caption, present = make_caption(segments, order), {s["category_id"] for s in segments}
    image = _resize(sample.image, top, left, side, options.image_size)
    if rng.random() < 0.5:  # every class is symmetric under a mirror (stars and triangles rotate freely)
        image = image.flip(-1)
    return image, reword(rng, caption, present, options)


def _union_box(boxes: list[list[int]]) -> list[int]:
    """Smallest [x, y, w, h] box holding every box of ``boxes``."""
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
    return [x0, y0, x1 - x0, y1 - y0]


def make_group(world: SynthWorld, group: int, options: PairOptions) -> list[tuple[torch.Tensor, str]]:
    """The two pairs of group ``group``, both from pretrain scene ``group`` (rendered once for both).

    With probability ``paste_prob`` they are a minimal pair (see :mod:`dearli.pretrain.paste`); otherwise
    each is, independently, a crop centred on a thing (``crop_prob``) or a scene window. Two views of one
    scene share its stuff, so they are hard negatives of each other too.
    """
    sample = world.sample(group, STREAM)
    group_rng = np.random.default_rng([world.seed, _PASTE_SEED_TAG, group])
    if group_rng.random() < options.paste_prob:
        painted = minimal_pair(group_rng, sample, [world.seed, _PASTE_SEED_TAG + 1, group])
        box = _union_box([segments[-1]["bbox"] for _, _, segments in painted])
        pairs = []
        for image, segment_map, segments in painted:
            rng = np.random.default_rng([world.seed, _PASTE_SEED_TAG + 2, group])  # the same draws for both
            window = crop_window(rng, box, segment_map.shape, options)
            pairs.append(_caption_window(rng, SynthSample(image, segment_map, segments, ""), window, options,
                                         segments[-1]))
        return pairs
    pairs = []
    for member in range(GROUP_SIZE):
        rng = np.random.default_rng([world.seed, _CROP_SEED_TAG, group, member])
        target = pick_instance(rng, sample, options.balance) if rng.random() < options.crop_prob else None
        if target is not None:
            window = crop_window(rng, target["bbox"], sample.segment_map.shape, options)
        else:
            window = scene_window(rng, sample.segment_map.shape, options.scene_min_side)
        pairs.append(_caption_window(rng, sample, window, options, target))
    return pairs


def scene_window(rng: np.random.Generator, size: tuple[int, int], min_side: int) -> tuple[int, int, int] | None:
    """A random square window of side in [min_side, shorter side]; None (the whole scene) if min_side is 0."""
    short = min(size)
    if min_side <= 0 or min_side >= short:
        return None
    side = int(rng.integers(min_side, short + 1))
    return int(rng.integers(size[0] - side + 1)), int(rng.integers(size[1] - side + 1)), side


def make_batch(world: SynthWorld, first_index: int, batch_size: int, options: PairOptions
               ) -> tuple[torch.Tensor, list[str]]:
    """Pairs first_index .. first_index + batch_size - 1: (B×3×S×S float in [0, 255], B captions)."""
    first_group, last_group = first_index // GROUP_SIZE, (first_index + batch_size - 1) // GROUP_SIZE
    pairs = [pair for g in range(first_group, last_group + 1) for pair in make_group(world, g, options)]
    offset = first_index - first_group * GROUP_SIZE
    pairs = pairs[offset:offset + batch_size]
    return torch.stack([p[0] for p in pairs]), [p[1] for p in pairs]
