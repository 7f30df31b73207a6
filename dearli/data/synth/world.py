"""SynthWorld: a deterministic, infinite stream of captioned panoptic scenes.

``SynthWorld(seed).sample(index)`` depends only on (seed, stream, index): each sample draws from its own
numpy Generator, so samples can be produced in any order, in parallel, or one at a time. Streams keep
independent image sets apart: "train" and "val" feed ``dearli synth``; "pretrain" is for captioned
pretraining (e.g. the small CLIP) and never repeats a dataset image, so captions cannot leak labels of
the unlabeled training images.

Categories: ids contiguous from 0 (things first, then stuff); a category id equals the contiguous
training id and the semantic-PNG value. Segment ids in ``segment_map`` are 1..N in painting order
(stuff first), 0 = VOID.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dearli.data.coco_format import IGNORE_LABEL, VOID_ID
from dearli.data.synth.captions import make_caption
from dearli.data.synth.classes import CLASSES, coco_categories
from dearli.data.synth.scene import Canvas, compose
from dearli.data.synth.shapes import bbox_xywh

DEFAULT_IMAGE_SIZE = (128, 128)
MIN_IMAGE_SIDE = 32  # below this the smallest shapes vanish
MAX_IMAGE_SIDE = 2048
STREAMS = {"train": 0, "val": 1, "pretrain": 2}
# Thing/crowd fragments smaller than this after occlusion are left VOID rather than annotated:
# a handful of pixels is no object a model (or annotator) can be asked to find.
MIN_THING_AREA = 6


@dataclass(frozen=True)
class SynthSample:
    """One scene.

    Attributes:
        image: H×W×3 uint8 RGB.
        segment_map: H×W int32 panoptic segment ids, 0 = VOID.
        segments: one dict per segment id in ``segment_map``, ordered by id:
            {"id", "category_id", "iscrowd" (0/1), "area" (pixels), "bbox" [x, y, w, h]}.
        caption: sentence naming every class present (see captions.py).
    """

    image: np.ndarray
    segment_map: np.ndarray
    segments: list[dict]
    caption: str

    def semantic_map(self) -> np.ndarray:
        """H×W uint8 contiguous class ids, IGNORE_LABEL (255) on VOID; crowd pixels carry their class."""
        lut = np.full(len(self.segments) + 1, IGNORE_LABEL, dtype=np.uint8)
        for seg in self.segments:
            lut[seg["id"]] = seg["category_id"]
        return lut[self.segment_map]

    @property
    def category_ids(self) -> set[int]:
        """Category ids of all segments (crowds included)."""
        return {seg["category_id"] for seg in self.segments}


def _check_size(image_size: tuple[int, int]) -> tuple[int, int]:
    if len(image_size) != 2:
        raise ValueError(f"image_size must be (height, width), got {image_size!r}")
    height, width = (int(v) for v in image_size)
    for side in (height, width):
        if not MIN_IMAGE_SIDE <= side <= MAX_IMAGE_SIDE:
            raise ValueError(f"image sides must lie in [{MIN_IMAGE_SIDE}, {MAX_IMAGE_SIDE}], got {image_size}")
    return height, width


def finalize(canvas: Canvas) -> tuple[np.ndarray, list[dict]]:
    """Drop tiny or fully hidden segments, renumber ids 1..N and measure areas and boxes.

    Returns:
        (segment_map H×W int32, segments list of dicts ordered by id).
    """
    provisional = canvas.ids
    areas = np.bincount(provisional.ravel(), minlength=len(canvas.segments) + 1)
    lut = np.zeros(len(canvas.segments) + 1, dtype=np.int32)
    kept: list[tuple[int, int]] = []
    for pid, (category_id, iscrowd) in enumerate(canvas.segments, start=1):
        minimum = MIN_THING_AREA if CLASSES[category_id].isthing else 1
        if areas[pid] >= minimum:
            kept.append((category_id, iscrowd))
            lut[pid] = len(kept)
    lut[VOID_ID] = VOID_ID
    segment_map = lut[provisional]
    segments = []
    for sid, (category_id, iscrowd) in enumerate(kept, start=1):
        mask = segment_map == sid
        segments.append({"id": sid, "category_id": category_id, "iscrowd": iscrowd,
                         "area": int(mask.sum()), "bbox": bbox_xywh(mask)})
    return segment_map, segments


class SynthWorld:
    """Generator of synthetic panoptic scenes.

    Args:
        seed: non-negative integer; together with (stream, index) it fixes a sample bit for bit.
        image_size: (H, W) in pixels.
    """

    def __init__(self, seed: int, image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE):
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.seed = int(seed)
        self.image_size = _check_size(image_size)

    @property
    def categories(self) -> list[dict]:
        """COCO-panoptic categories: {"id", "name", "isthing" (0/1), "color", "supercategory"}, ids 0..K-1."""
        return coco_categories()

    @property
    def num_classes(self) -> int:
        return len(CLASSES)

    def rng(self, index: int, stream: str = "train") -> np.random.Generator:
        """The Generator of sample ``index`` of ``stream`` (independent of every other sample)."""
        if stream not in STREAMS:
            raise ValueError(f"unknown stream {stream!r}; expected one of {sorted(STREAMS)}")
        if int(index) < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        return np.random.default_rng([self.seed, STREAMS[stream], int(index)])

    def sample(self, index: int, stream: str = "train") -> SynthSample:
        """Render sample ``index`` of ``stream`` ("train", "val" or "pretrain")."""
        canvas = compose(self.rng(index, stream), self.image_size)
        image = np.clip(np.rint(canvas.image), 0, 255).astype(np.uint8)
        segment_map, segments = finalize(canvas)
        stuff_order = [cid for cid, _ in canvas.segments if not CLASSES[cid].isthing]
        return SynthSample(image, segment_map, segments, make_caption(segments, stuff_order))
