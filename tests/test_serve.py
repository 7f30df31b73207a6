"""``dearli serve``: the request checks, then Ray Serve on loopback answering real HTTP requests exactly as
``dearli predict`` labels the same image with the same checkpoint."""

from __future__ import annotations

import base64
import io
import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from dearli.cli import main
from dearli.config import load_config
from dearli.data.coco_format import rgb2id
from dearli.data.dataset import load_dataset
from dearli.model.m2f_lang import build_m2f_lang
from dearli.predict.labeler import MAX_NAME_CHARS, RequestError, check_classes, decode_image, parse_request
from dearli.training.checkpoint import save_checkpoint

TIMEOUT_S = 120  # per request; the burst below is bounded by it too


def png_of(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("body, content_type, status, words", [
    (b"", "", 400, "empty request body"),
    (b"not an image at all", "application/octet-stream", 400, "not an image"),
    (b"{not json", "application/json", 400, "not valid JSON"),
    (b'{"classes": []}', "application/json", 400, "'image'"),
    (b'{"image": "@@@"}', "application/json", 400, "base64"),
    (json.dumps({"image": "AAAA", "classes": []}).encode(), "application/json", 400, "non-empty list"),
    (json.dumps({"image": "AAAA", "classes": [{"name": "x" * (MAX_NAME_CHARS + 1)}]}).encode(), "", 400,
     "at most"),
    (json.dumps({"image": "AAAA", "classes": [{"name": "sky", "isthing": "yes"}]}).encode(), "", 400, "isthing"),
    (json.dumps({"image": "AAAA", "min_score": 3}).encode(), "", 400, "min_score"),
    (json.dumps({"image": "AAAA", "classes": [{"id": "x", "name": "sky"}]}).encode(), "", 400, "integer"),
])
def test_bad_requests_get_a_status_and_a_one_line_reason(body, content_type, status, words):
    with pytest.raises(RequestError) as err:
        data, _, _ = parse_request(body, content_type)
        decode_image(data)
    assert err.value.status == status and words in err.value.reason and "\n" not in err.value.reason


def test_request_parsing_keeps_what_is_good():
    image = png_of(np.zeros((4, 6, 3), np.uint8))
    assert parse_request(image, "image/png") == (image, None, 0.0)
    body = json.dumps({"image": base64.b64encode(image).decode(), "min_score": 0.5,
                       "classes": [{"name": "sky"}, {"name": "red circle,red disk", "isthing": True}]}).encode()
    data, classes, min_score = parse_request(body, "application/json")
    assert data == image and min_score == 0.5
    assert classes == [{"id": 0, "name": "sky", "isthing": False}, {"id": 1, "name": "red circle,red disk",
                                                                     "isthing": True}]
    assert decode_image(data).shape == (4, 6, 3)
    with pytest.raises(RequestError) as err:
        decode_image(png_of(np.zeros((40, 40, 3), np.uint8)), max_pixels=1000)
    assert err.value.status == 413
    with pytest.raises(RequestError, match="classes"):
        check_classes([{"id": 1, "name": "a"}, {"id": 1, "name": "b"}])  # two classes with one id


@pytest.fixture(scope="module")
def served(ray_local, small_world, tmp_path_factory):
    """Serve on a free loopback port with one replica of a random tiny checkpoint; (url, checkpoint)."""
    from ray import serve

    from dearli.predict.serve import ServeOptions, build_app, start

    cfg = load_config("tiny", [f"data.dataset={small_world}", "model.inference.test_short_side=64",
                               "model.ensemble.alpha_clip=0.4"])
    torch.manual_seed(0)
    model = build_m2f_lang(cfg.model, load_dataset(small_world).categories.synonyms)
    checkpoint = save_checkpoint(tmp_path_factory.mktemp("run"), 1, model, cfg)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = start(build_app(str(checkpoint), None, ServeOptions(max_pixels=64 * 64)), "127.0.0.1", port)
    yield url, checkpoint
    serve.shutdown()


def request(url: str, body: bytes | None = None, content_type: str = "image/png",
            method: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def answer_ids(answer: dict) -> np.ndarray:
    return rgb2id(np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["png"]))).convert("RGB")))


def test_serve_answers_as_predict_does_and_survives_bad_requests(served, small_world, tmp_path):
    url, checkpoint = served
    info = load_dataset(small_world)
    record = info.split("val").records[0]
    image_bytes = record.image_path.read_bytes()

    assert main(["predict", "--checkpoint", str(checkpoint), "--dataset", str(small_world), "--out",
                 str(tmp_path / "pred"), "--visualize", "0"]) == 0
    expected_ids = rgb2id(np.asarray(Image.open(tmp_path / "pred" / "panoptic" / f"{record.stem}.png").convert("RGB")))
    predicted = json.loads((tmp_path / "pred" / "panoptic.json").read_text())
    expected_segments = next(a for a in predicted["annotations"] if a["image_id"] == record.image_id)["segments_info"]

    status, answer = request(url, image_bytes)
    assert status == 200
    assert (answer["height"], answer["width"]) == expected_ids.shape
    np.testing.assert_array_equal(answer_ids(answer), expected_ids)
    assert expected_segments, "a random model that predicts nothing would prove nothing here"
    assert sorted((s["id"], s["category_id"]) for s in answer["segments_info"]) == sorted(
        (s["id"], s["category_id"]) for s in expected_segments)
    names = {c.id: c.name for c in info.categories.categories}
    assert all(s["category_name"] == names[s["category_id"]] for s in answer["segments_info"])

    status, listed = request(url, method="GET")
    assert status == 200 and [c["id"] for c in listed["classes"]] == [c.id for c in info.categories.categories]

    # An open vocabulary: two classes with ids of the caller's own.
    own = [{"id": 7, "name": "sky", "isthing": False}, {"id": 9, "name": "red circle,red disk", "isthing": True}]
    body = json.dumps({"image": base64.b64encode(image_bytes).decode(), "classes": own}).encode()
    status, custom = request(url, body, "application/json")
    assert status == 200 and custom["segments_info"]
    assert {s["category_id"] for s in custom["segments_info"]} <= {7, 9}
    assert all(s["category_name"] in ("sky", "red circle") for s in custom["segments_info"])

    too_large = png_of(np.zeros((80, 80, 3), np.uint8))  # 6400 px > the 4096 served
    for body, content_type, code in ((b"not an image", "image/png", 400), (too_large, "image/png", 413),
                                     (json.dumps({"image": "AAAA", "classes": []}).encode(), "application/json", 400),
                                     (json.dumps({"image": base64.b64encode(image_bytes).decode(), "classes": [
                                         {"name": "x" * (MAX_NAME_CHARS + 1)}]}).encode(), "application/json", 400)):
        status, error = request(url, body, content_type)
        assert status == code and error["error"] and "\n" not in error["error"]
    assert request(url, image_bytes, method="PUT")[0] == 405

    # A burst of concurrent requests, bounded in count and time: every one answered, all alike.
    with ThreadPoolExecutor(max_workers=6) as pool:
        burst = list(pool.map(lambda _: request(url, image_bytes), range(12)))
    assert all(status == 200 for status, _ in burst)
    assert all(np.array_equal(answer_ids(a), expected_ids) for _, a in burst)
