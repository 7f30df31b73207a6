"""The labeling endpoint's model side, without Ray: one request (an image, optionally a class list) in, a
COCO-panoptic answer out. :mod:`dearli.predict.serve` puts it behind Ray Serve's HTTP proxy.

A request body is either the image file itself (PNG, JPEG, ...) or JSON::

    {"image": "<base64 of the image file>", "classes": [{"name": "red circle,red disk", "isthing": true}, ...],
     "min_score": 0.0}

``classes`` (optional) is an open vocabulary: M2F-Lang classifies by the text embeddings of the names, so
any list works without retraining; the text embeddings of a list are computed once and kept (the most
recent lists, see :data:`dearli.model.text_classifier.MEMORY_LISTS_PER_BACKBONE`). The answer::

    {"width", "height", "png": "<base64 PNG of segment ids, COCO id2rgb>",
     "segments_info": [{"id", "category_id", "category_name", "isthing", "score", "area", "bbox"}]}

with ``category_id`` the class list's own ids (the checkpoint dataset's unless the request brought a list).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import threading
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from dearli.caches.records import DEFAULT_MAX_PIXELS
from dearli.data.panoptic import CategoryMap
from dearli.errors import DataError
from dearli.model.predictor import predict_image
from dearli.predict.outputs import keep_confident, segment_records
from dearli.predict.worker import load_predictor, png_bytes

MAX_REQUEST_BYTES = 32 * 1024 * 1024  # a request body larger than this is refused before it is decoded
MAX_CLASSES = 1000  # classes in one request's list (COCO has 133, ADE20K-full 847)
# CLIP reads 77 tokens and the longest prompt template adds about 10: a longer name would be cut silently.
MAX_NAME_CHARS = 200


class RequestError(Exception):
    """A bad request: HTTP ``status`` and a one-line ``reason`` for the caller."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def parse_request(body: bytes, content_type: str = "") -> tuple[bytes, list[dict] | None, float]:
    """(image file bytes, class list or None, min_score) of a request body; RequestError when malformed."""
    if len(body) > MAX_REQUEST_BYTES:
        raise RequestError(413, f"request body of {len(body)} bytes exceeds {MAX_REQUEST_BYTES}")
    if not body:
        raise RequestError(400, "empty request body: send an image file or JSON with an 'image' field")
    if "json" not in content_type.lower() and body[:1] != b"{":
        return body, None, 0.0
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, f"body is not valid JSON: {err}") from None
    if not isinstance(request, dict) or not isinstance(request.get("image"), str):
        raise RequestError(400, "JSON body needs 'image': the image file as a base64 string")
    try:
        image = base64.b64decode(request["image"], validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "'image' is not valid base64") from None
    min_score = request.get("min_score", 0.0)
    if not isinstance(min_score, (int, float)) or not 0.0 <= float(min_score) <= 1.0:
        raise RequestError(400, f"'min_score' must be a number in [0, 1], got {min_score!r}")
    classes = request.get("classes")
    return image, None if classes is None else check_classes(classes), float(min_score)


def check_classes(classes: Any) -> list[dict]:
    """A request's class list as classes.json entries ({id, name, isthing}); RequestError when unusable."""
    if not isinstance(classes, list) or not classes:
        raise RequestError(400, "'classes' must be a non-empty list of {\"name\", \"isthing\"} objects")
    if len(classes) > MAX_CLASSES:
        raise RequestError(400, f"'classes' has {len(classes)} entries, at most {MAX_CLASSES} are served")
    entries = []
    for i, entry in enumerate(classes):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"].strip():
            raise RequestError(400, f"classes[{i}]: needs a non-empty string 'name'")
        if len(entry["name"]) > MAX_NAME_CHARS:
            raise RequestError(400, f"classes[{i}]: name of {len(entry['name'])} characters, at most "
                                    f"{MAX_NAME_CHARS} (CLIP reads 77 tokens)")
        if not isinstance(entry.get("isthing", False), bool):
            raise RequestError(400, f"classes[{i}]: 'isthing' must be true or false")
        entries.append({"id": entry.get("id", i), "name": entry["name"], "isthing": entry.get("isthing", False)})
    try:
        CategoryMap.from_dicts(entries, "request")
    except DataError as err:
        raise RequestError(400, f"'classes': {err}") from None
    return entries


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image file bytes -> H×W×3 uint8 RGB; RequestError for what is not an image or is too large."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise RequestError(413, f"image of {width}×{height} pixels exceeds {max_pixels}")
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise RequestError(400, "body is not an image file PIL can read (PNG, JPEG, ...)") from None


class Labeler:
    """A checkpoint that labels one image at a time with the checkpoint's classes or a request's own.

    Thread-safe: the model's vocabulary is switched and used under one lock, so concurrent requests with
    different class lists never see each other's classes.
    """

    def __init__(self, checkpoint: str | dict[str, Any], categories: CategoryMap, device: str = "cpu",
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.model, cfg = load_predictor(checkpoint, categories, device)
        self.model_cfg = cfg.model
        self.default = categories
        self.max_pixels = max_pixels
        self.lock = threading.Lock()

    def label(self, body: bytes, content_type: str = "") -> dict[str, Any]:
        """One request body -> the COCO-panoptic answer (see the module docstring)."""
        data, classes, min_score = parse_request(body, content_type)
        image = decode_image(data, self.max_pixels)
        categories = self.default if classes is None else CategoryMap.from_dicts(classes, "request")
        with self.lock:
            self.model.set_classes(categories.synonyms)  # cheap for a list seen before: its embeddings are kept
            pred = predict_image(self.model, image, self.model_cfg, categories.thing_ids)
        panoptic, segments = keep_confident(pred.panoptic, pred.segments, min_score)
        return {"width": int(image.shape[1]), "height": int(image.shape[0]),
                "png": base64.b64encode(png_bytes(panoptic)).decode("ascii"),
                "segments_info": segment_records(panoptic, segments, categories)}
