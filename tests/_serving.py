"""HTTP helpers of the tests that talk to a served labeling endpoint (``dearli serve``) on loopback."""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request

import numpy as np
from PIL import Image

from dearli.data.coco_format import rgb2id

TIMEOUT_S = 120  # per request (a burst of requests is bounded by it too)
TOKEN = "s3cret-token"


def png_of(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def request(url: str, body: bytes | None = None, content_type: str = "image/png",
            method: str | None = None, token: str | None = TOKEN) -> tuple[int, dict]:
    headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def answer_ids(answer: dict) -> np.ndarray:
    return rgb2id(np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["png"]))).convert("RGB")))
