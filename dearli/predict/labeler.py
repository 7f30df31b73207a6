"""The labeling endpoint's model side, without Ray: one request (an image, optionally a class list) in, a
COCO-panoptic answer out. :mod:`dearli.predict.serve` puts it behind Ray Serve's HTTP proxy.

A request body is either the image file itself (PNG, JPEG or WebP) or JSON with exactly these fields::

    {"image": "<base64 of the image file>", "classes": [{"name": "red circle,red disk", "isthing": true}, ...],
     "min_score": 0.0}

``classes`` (optional) is an open vocabulary: M2F-Lang classifies by the text embeddings of the names, so
any list works without retraining; a new list is encoded once, outside the model's lock, and kept in memory
(the most recent lists, see :data:`dearli.model.text_classifier.MEMORY_LISTS_PER_BACKBONE`; never on disk).
The answer::

    {"width", "height", "png": "<base64 PNG of segment ids, COCO id2rgb>",
     "segments_info": [{"id", "category_id", "category_name", "isthing", "score", "area", "bbox"}]}

with ``category_id`` the class list's own ids (the checkpoint dataset's unless the request brought a list).

Every bound a client could push is checked before the work it would cost: the body's bytes, the image's
format and pixels (from its header, before decoding), the classes, their synonyms (each is 14 prompts through
CLIP's text tower), and every field's type. A refusal is a :class:`RequestError`: an HTTP status and a reason
of at most :data:`MAX_REASON_CHARS` characters on one line.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from dearli.data.panoptic import CategoryMap, parse_synonyms
from dearli.errors import DataError
from dearli.model.predictor import predict_image
from dearli.model.text_classifier import TextEmbeddings, class_text_embeddings
from dearli.predict.outputs import keep_confident, segment_records
from dearli.predict.worker import load_predictor, png_bytes

MAX_REQUEST_BYTES = 32 * 1024 * 1024  # a request body larger than this is refused while it streams in
# Pixels of one image a replica labels by default: at the limit a tiny-model replica's peak rose by 1.4 GiB (the
# README's hostile-request table; it does not grow with the queries); the training crop is 640² (0.4 MP), a
# 12 MP photo fits.
SERVE_MAX_PIXELS = 4096 * 4096
MAX_CLASSES = 1000  # classes in one request's list (COCO has 133, ADE20K-full 847)
# Synonyms of a request's whole list: each is 14 prompts through the text tower (ADE20K-150 with synonyms ~400).
MAX_SYNONYMS = 2000
# CLIP reads 77 tokens and the longest prompt template adds about 10: a longer name would be cut silently.
MAX_NAME_CHARS = 200
MAX_REASON_CHARS = 200
FIELDS = ("image", "classes", "min_score")
CLASS_FIELDS = ("id", "name", "isthing", "supercategory", "color")  # COCO's category keys are accepted
SERVED_FORMATS = ("PNG", "JPEG", "WEBP")
# The first bytes of image files: the served formats, and others named in the refusal.
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
               (b"GIF8", "GIF"), (b"BM", "BMP"), (b"\x00\x00\x01\x00", "ICO"), (b"%PDF", "PDF"))


class RequestError(Exception):
    """A bad request: HTTP ``status`` and a one-line ``reason`` (at most MAX_REASON_CHARS) for the caller."""

    def __init__(self, status: int, reason: str):
        reason = " ".join(reason.split())
        if len(reason) > MAX_REASON_CHARS:
            reason = reason[:MAX_REASON_CHARS - 3] + "..."
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _shown(value: Any, limit: int = 40) -> str:
    """A client's value, cut short for a reason."""
    text = repr(value) if not isinstance(value, (list, dict)) else f"a {type(value).__name__} of {len(value)}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True)
class LabelRequest:
    """A parsed request: the image file (format and size checked from its header, not yet decoded), the
    request's own classes (None: the served ones) and the score below which segments are dropped."""

    image: bytes
    width: int
    height: int
    categories: CategoryMap | None
    min_score: float


def parse_request(body: bytes, content_type: str = "") -> tuple[bytes, list[dict] | None, float]:
    """(image file bytes, class list or None, min_score) of a request body; RequestError when malformed."""
    if len(body) > MAX_REQUEST_BYTES:
        raise RequestError(413, f"request body of {len(body)} bytes exceeds {MAX_REQUEST_BYTES}")
    if not body:
        raise RequestError(400, "empty request body: send an image file or JSON with an 'image' field")
    if "json" not in content_type.lower() and body[:1] != b"{":
        return body, None, 0.0
    request = load_json(body)
    if not isinstance(request, dict):
        raise RequestError(400, "JSON body must be an object with an 'image' field")
    unknown = sorted(set(request) - set(FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field {_shown(unknown[0])}; the fields are {', '.join(FIELDS)}")
    if not isinstance(request.get("image"), str):
        raise RequestError(400, "JSON body needs 'image': the image file as a base64 string")
    try:
        image = base64.b64decode(request["image"], validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "'image' is not valid base64") from None
    min_score = request.get("min_score", 0.0)
    if not _unit_number(min_score):
        raise RequestError(400, f"'min_score' must be a number in [0, 1], got {_shown(min_score)}")
    classes = request.get("classes")
    return image, None if classes is None else check_classes(classes), float(min_score)


def load_json(body: bytes) -> Any:
    """A request body as JSON; RequestError 400 (with the reason) for anything else, NaN and too deep included."""
    def refuse_constant(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(body, parse_constant=refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # also too deep, too many digits, NaN
        raise RequestError(400, f"body is not valid JSON: {_shown(str(err), 120)}") from None


def _unit_number(value: Any) -> bool:
    """Whether ``value`` is a JSON number (not a boolean) in [0, 1]; huge integers compare without floats."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return 0 <= value <= 1 and (isinstance(value, int) or math.isfinite(value))


def check_classes(classes: Any) -> list[dict]:
    """A request's class list as classes.json entries ({id, name, isthing}); RequestError when unusable."""
    if not isinstance(classes, list) or not classes:
        raise RequestError(400, "'classes' must be a non-empty list of {\"name\", \"isthing\"} objects")
    if len(classes) > MAX_CLASSES:
        raise RequestError(400, f"'classes' has {len(classes)} entries, at most {MAX_CLASSES} are served")
    entries, synonyms = [], 0
    for i, entry in enumerate(classes):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"].strip():
            raise RequestError(400, f"classes[{i}]: needs a non-empty string 'name'")
        unknown = sorted(set(entry) - set(CLASS_FIELDS))
        if unknown:
            raise RequestError(400, f"classes[{i}]: unknown field {_shown(unknown[0])}; the fields are "
                                    f"{', '.join(CLASS_FIELDS)}")
        if len(entry["name"]) > MAX_NAME_CHARS:
            raise RequestError(400, f"classes[{i}]: name of {len(entry['name'])} characters, at most "
                                    f"{MAX_NAME_CHARS} (CLIP reads 77 tokens)")
        if not isinstance(entry.get("isthing", False), bool):
            raise RequestError(400, f"classes[{i}]: 'isthing' must be true or false")
        synonyms += len(parse_synonyms(entry["name"]))
        if synonyms > MAX_SYNONYMS:
            raise RequestError(400, f"'classes' has more than {MAX_SYNONYMS} names and synonyms in all (each is "
                                    "14 CLIP prompts); send a shorter list")
        entries.append({"id": entry.get("id", i), "name": entry["name"], "isthing": entry.get("isthing", False)})
    try:
        CategoryMap.from_dicts(entries, "request")
    except DataError as err:
        raise RequestError(400, f"'classes': {err}") from None
    return entries


def image_format(data: bytes) -> str:
    """The format of an image file from its first bytes ("PNG", "JPEG", "WEBP", "TIFF", ...; "" if unknown)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for signature, name in _SIGNATURES if data.startswith(signature)), "")


def inspect_image(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) of a served image file, read from its header without decoding; RequestError (415 for
    another format, 413 for more than ``max_pixels``, 400 for what is not an image) otherwise."""
    kind = image_format(data)
    if kind and kind not in SERVED_FORMATS:
        raise RequestError(415, f"{kind} images are not served: send PNG, JPEG or WebP")
    if not kind:
        raise RequestError(400, "body is not a PNG, JPEG or WebP image file")
    try:
        with Image.open(io.BytesIO(data), formats=[kind]) as image:
            width, height = image.size
    except Image.DecompressionBombError:  # Pillow's own guard (about 179 MP): too large, whatever max_pixels says
        raise RequestError(413, f"image exceeds {max_pixels} pixels") from None
    except Exception:  # noqa: BLE001 - a broken header of any kind is the client's file, never a 500
        raise RequestError(400, f"body is not a readable {kind} image file") from None
    if width * height > max_pixels:
        raise RequestError(413, f"image of {width}×{height} pixels exceeds {max_pixels}")
    return width, height


def decode_image(data: bytes, max_pixels: int = SERVE_MAX_PIXELS) -> np.ndarray:
    """Image file bytes -> H×W×3 uint8 RGB; RequestError for what is not a served image or is too large."""
    inspect_image(data, max_pixels)
    try:
        with Image.open(io.BytesIO(data), formats=[image_format(data)]) as image:
            return np.array(image.convert("RGB"))  # writable: torch takes it as it is
    except Exception:  # noqa: BLE001 - truncated or corrupt pixel data
        raise RequestError(400, f"the {image_format(data)} image file is truncated or corrupt") from None


class Labeler:
    """A checkpoint that labels one image at a time with the checkpoint's classes or a request's own.

    Thread-safe: the model's vocabulary is switched and used under one lock, so concurrent requests with
    different class lists never see each other's classes; a new list's text embeddings are computed before,
    outside the lock (:meth:`text_of`). One image is decoded and labeled at a time, so a replica's memory
    holds one request's pixels.
    """

    def __init__(self, checkpoint: str | dict[str, Any], categories: CategoryMap, device: str = "cpu",
                 max_pixels: int = SERVE_MAX_PIXELS):
        self.model, cfg = load_predictor(checkpoint, categories, device)
        self.model_cfg = cfg.model
        self.default = categories
        self.default_text: TextEmbeddings = self.model.text
        self.max_pixels = max_pixels
        self.lock = threading.Lock()

    def prepare(self, body: bytes, content_type: str = "") -> LabelRequest:
        """Parse and check a request body; cheap (the image is not decoded)."""
        data, classes, min_score = parse_request(body, content_type)
        width, height = inspect_image(data, self.max_pixels)
        categories = None if classes is None else CategoryMap.from_dicts(classes, "request")
        return LabelRequest(data, width, height, categories, min_score)

    def prepare_image(self, data: bytes) -> LabelRequest:
        """An image file (never a JSON request) to label with the served classes; checked as :meth:`prepare`."""
        width, height = inspect_image(data, self.max_pixels)
        return LabelRequest(data, width, height, None, 0.0)

    def text_of(self, request: LabelRequest) -> TextEmbeddings:
        """The text embeddings of the request's class list (the served ones without a list); not locked."""
        if request.categories is None:
            return self.default_text
        return class_text_embeddings(self.model.backbone, request.categories.synonyms)

    def run(self, request: LabelRequest, text: TextEmbeddings,
            check: Callable[[], None] | None = None) -> dict[str, Any]:
        """The answer to a prepared request (see the module docstring); ``check`` may raise to stop the work."""
        panoptic, records = self.segments(request, text, check)
        return {"width": int(panoptic.shape[1]), "height": int(panoptic.shape[0]),
                "png": base64.b64encode(png_bytes(panoptic)).decode("ascii"), "segments_info": records}

    def segments(self, request: LabelRequest, text: TextEmbeddings,
                 check: Callable[[], None] | None = None) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """(H×W segment ids, their ``segments_info`` records) of a prepared request, as :meth:`run` answers."""
        with self.lock:
            if check is not None:
                check()
            image = decode_image(request.image, self.max_pixels)
            return self._predict(image, request.categories or self.default, text, request.min_score, check)

    def label_array(self, image: np.ndarray, min_score: float = 0.0) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """(H×W segment ids, records) of an H×W×3 uint8 RGB image with the served classes; no pixel bound."""
        with self.lock:
            return self._predict(image, self.default, self.default_text, min_score, None)

    def _predict(self, image: np.ndarray, categories: CategoryMap, text: TextEmbeddings, min_score: float,
                 check: Callable[[], None] | None) -> tuple[np.ndarray, list[dict[str, Any]]]:
        self.model.set_text(categories.synonyms, text)
        pred = predict_image(self.model, image, self.model_cfg, categories.thing_ids, semantic=False, check=check)
        panoptic, segments = keep_confident(pred.panoptic, pred.segments, min_score)
        return panoptic, segment_records(panoptic, segments, categories)

    def label(self, body: bytes, content_type: str = "") -> dict[str, Any]:
        """One request body -> the COCO-panoptic answer, all three steps in the calling thread."""
        request = self.prepare(body, content_type)
        return self.run(request, self.text_of(request))
