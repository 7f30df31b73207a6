"""``dearli serve``: the request checks, then Ray Serve on loopback answering real HTTP requests exactly as
``dearli predict`` labels the same image with the same checkpoint."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import time
import zlib

import numpy as np
import pytest
import torch
from _serving import TOKEN, answer_ids, png_of, request
from _tiny_model import tiny_checkpoint
from PIL import Image

from dearli.cli import main
from dearli.config import load_config
from dearli.data.coco_format import rgb2id
from dearli.data.dataset import load_dataset
from dearli.model.m2f_lang import build_m2f_lang
from dearli.predict.labeler import (
    MAX_NAME_CHARS,
    MAX_REASON_CHARS,
    MAX_SYNONYMS,
    SERVE_MAX_PIXELS,
    RequestError,
    check_classes,
    decode_image,
    inspect_image,
    parse_request,
)
from dearli.training.checkpoint import save_checkpoint


def tiff_of(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="TIFF")
    return buffer.getvalue()


def json_body(**fields) -> bytes:
    return json.dumps({"image": "AAAA", **fields}).encode()


SYNONYM_FLOOD = [{"name": ",".join("a" * 99)} for _ in range(1000)]  # 99,000 synonyms, every name < 200 chars


@pytest.mark.parametrize("body, content_type, status, words", [
    (b"", "", 400, "empty request body"),
    (b"not an image at all", "application/octet-stream", 400, "not a PNG, JPEG or WebP"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, "image/png", 400, "not a readable PNG"),
    (tiff_of(np.zeros((4, 4, 3), np.uint8)), "image/tiff", 415, "TIFF images are not served"),
    (b"{not json", "application/json", 400, "not valid JSON"),
    (b'{"classes": []}', "application/json", 400, "'image'"),
    (b'{"image": "@@@"}', "application/json", 400, "base64"),
    (b"[" * 100_000 + b"]" * 100_000, "application/json", 400, "not valid JSON"),
    (b'{"image": "AAAA", "min_score": ' + b"9" * 5000 + b"}", "application/json", 400, "not valid JSON"),
    (b'{"image": "AAAA", "min_score": 1' + b"0" * 320 + b"}", "application/json", 400, "min_score"),
    (b'{"image": "AAAA", "min_score": NaN}', "application/json", 400, "not valid JSON"),
    (b'{"image": "AAAA", "min_score": 1e400}', "application/json", 400, "min_score"),
    (json_body(min_score=True), "", 400, "min_score"),
    (json_body(min_score=["x" * 10] * 200_000), "", 400, "a list of 200000"),
    (json_body(min_scor=0.5), "", 400, "unknown field 'min_scor'"),
    (json_body(classes=[]), "application/json", 400, "non-empty list"),
    (json_body(classes=[{"name": "x" * (MAX_NAME_CHARS + 1)}]), "", 400, "at most"),
    (json_body(classes=[{"name": "sky", "isthing": "yes"}]), "", 400, "isthing"),
    (json_body(classes=[{"name": "sky", "colour": [1, 2, 3]}]), "", 400, "unknown field 'colour'"),
    (json_body(classes=SYNONYM_FLOOD), "", 400, f"more than {MAX_SYNONYMS} names and synonyms"),
    (json_body(min_score=3), "", 400, "min_score"),
    (json_body(classes=[{"id": "x", "name": "sky"}]), "", 400, "integer"),
])
def test_bad_requests_get_a_status_and_a_short_one_line_reason(body, content_type, status, words):
    with pytest.raises(RequestError) as err:
        data, _, _ = parse_request(body, content_type)
        decode_image(data)
    assert err.value.status == status and words in err.value.reason and "\n" not in err.value.reason
    assert len(err.value.reason) <= MAX_REASON_CHARS


def test_image_bounds_are_read_from_the_header_before_decoding():
    black = png_of(np.zeros((8000, 8000, 3), np.uint8))  # ~190 KB on the wire, 192 MB decoded
    with pytest.raises(RequestError) as err:
        inspect_image(black, SERVE_MAX_PIXELS)
    assert err.value.status == 413 and "8000×8000" in err.value.reason
    bomb = png_of(np.zeros((1, 1), np.uint8))  # a PNG whose header claims 14000×14000 (over Pillow's guard)
    header = b"IHDR" + (14000).to_bytes(4, "big") * 2 + bomb[24:29]
    bomb = bomb[:12] + header + zlib.crc32(header).to_bytes(4, "big") + bomb[33:]
    with pytest.raises(RequestError) as err:
        inspect_image(bomb, 10**9)  # a --max-pixels above Pillow's guard still means 413
    assert err.value.status == 413
    assert inspect_image(png_of(np.zeros((3, 5, 3), np.uint8)), 15) == (5, 3)
    webp = io.BytesIO()
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(webp, format="WEBP")
    assert decode_image(webp.getvalue()).shape == (4, 6, 3)


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


def test_a_diagnostic_checkpoint_is_refused_in_one_line_before_ray_starts(small_world, tmp_path, capsys,
                                                                           monkeypatch):
    """A run with ssl.oracle_labels trained its student on the unlabeled images' ground truth: no model to serve."""
    from dearli.predict import serve as serve_module
    from dearli.predict.serve import serving_payload

    monkeypatch.setattr("dearli.runtime.ensure_ray", lambda *a, **k: pytest.fail("Ray started for a refused model"))
    cfg = load_config("tiny", [f"data.dataset={small_world}", "ssl.oracle_labels=true"])
    torch.manual_seed(0)
    model = build_m2f_lang(cfg.model, load_dataset(small_world).categories.synonyms)
    checkpoint = str(save_checkpoint(tmp_path, 1, model, cfg))
    with pytest.raises(serve_module.DataError, match=r"ssl\.oracle_labels=true.*--allow-diagnostic"):
        serving_payload(checkpoint)
    assert main(["serve", "--checkpoint", checkpoint]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"dearli serve: error: {checkpoint}: a diagnostic model")
    payload = serving_payload(checkpoint, allow_diagnostic=True)  # served anyway when asked, with a warning
    assert payload["step"] == 1 and "WARNING" in capsys.readouterr().err
    plain = str(save_checkpoint(tmp_path / "plain", 1, model, load_config("tiny", [f"data.dataset={small_world}"])))
    assert serving_payload(plain)["config"].ssl.oracle_labels is False and not capsys.readouterr().err


@pytest.fixture(scope="module")
def served(ray_local, small_world, tmp_path_factory):
    """Serve on a free loopback port with one replica of a random tiny checkpoint, a token and small bounds
    (one request held, two queued): (url, checkpoint)."""
    from ray import serve

    from dearli.predict.serve import build_app, start
    from dearli.predict.serve_options import ServeOptions

    checkpoint = tiny_checkpoint(tmp_path_factory.mktemp("run"), small_world,
                                 ["model.inference.test_short_side=64", "model.ensemble.alpha_clip=0.4"],
                                 record_dataset=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    options = ServeOptions(max_pixels=64 * 64, token=TOKEN, max_ongoing_requests=1, max_queued_requests=2)
    url = start(build_app(str(checkpoint), None, options), "127.0.0.1", port, options.request_timeout_s)
    yield url, checkpoint
    serve.shutdown()


@pytest.fixture(scope="module")
def predicted(served, small_world, tmp_path_factory):
    """``dearli predict`` of the served checkpoint on the val images: {stem: (ids, [(id, category_id)])}."""
    _, checkpoint = served
    out = tmp_path_factory.mktemp("pred")
    assert main(["predict", "--checkpoint", str(checkpoint), "--dataset", str(small_world), "--out", str(out),
                 "--visualize", "0"]) == 0
    annotations = json.loads((out / "panoptic.json").read_text())["annotations"]
    expected = {}
    for record in load_dataset(small_world).split("val").records:
        ids = rgb2id(np.asarray(Image.open(out / "panoptic" / f"{record.stem}.png").convert("RGB")))
        segments = next(a for a in annotations if a["image_id"] == record.image_id)["segments_info"]
        expected[record.stem] = (ids, sorted((s["id"], s["category_id"]) for s in segments))
    return expected


def test_serve_answers_as_predict_does_and_survives_bad_requests(served, predicted, small_world):
    url, _ = served
    info = load_dataset(small_world)
    record = info.split("val").records[0]
    image_bytes = record.image_path.read_bytes()
    expected_ids, expected_pairs = predicted[record.stem]

    status, answer = request(url, image_bytes)
    assert status == 200
    assert (answer["height"], answer["width"]) == expected_ids.shape
    np.testing.assert_array_equal(answer_ids(answer), expected_ids)
    assert expected_pairs, "a random model that predicts nothing would prove nothing here"
    assert sorted((s["id"], s["category_id"]) for s in answer["segments_info"]) == expected_pairs
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
    for token in (None, "wrong"):  # the token guards every method
        assert request(url, image_bytes, token=token)[0] == 401
        assert request(url, method="GET", token=token)[0] == 401


def test_hostile_load_gets_no_5xx_and_every_good_request_is_answered_right_or_429(served, predicted, small_world):
    """Good requests mixed with every hostile kind, from 12 clients at once at an endpoint that holds one
    request and queues two (bounded: 70 requests, each with a timeout)."""
    from dearli.bench.hostile import UNDER_LOAD, good_probes, hostile_probes, run_mixed, send, summarize

    url, _ = served
    records = load_dataset(small_world).split("val").records
    images = [r.image_path.read_bytes() for r in records]
    hostile = hostile_probes(images[0], TOKEN)
    probes = good_probes(images, 48, TOKEN) + hostile

    def correct(outcome) -> bool:
        ids, pairs = predicted[records[outcome.image].stem]
        got = sorted((s["id"], s["category_id"]) for s in outcome.answer["segments_info"])
        return np.array_equal(answer_ids(outcome.answer), ids) and got == pairs

    figures = summarize(run_mixed(url, probes, concurrency=12), probes, correct)
    assert figures["status_5xx"] == 0 and figures["good_other"] == {}, figures
    assert figures["good_wrong"] == 0 and figures["good_correct"] + figures["good_429"] == 48, figures
    assert figures["good_429"] > 0, "12 clients at once must overflow one held and two queued requests"
    assert figures["good_correct"] > 0
    assert all(entry["as_expected"] for entry in figures["hostile"].values()), figures["hostile"]
    assert figures["longest_reason"] <= MAX_REASON_CHARS
    for probe in hostile:  # alone, each kind gets its own answer (not a 429)
        outcome = send(url, probe)
        assert outcome.status in probe.expect and outcome.status != UNDER_LOAD, (probe.kind, outcome)
    status, answer = request(url, images[1])  # still up, still right
    assert status == 200 and np.array_equal(answer_ids(answer), predicted[records[1].stem][0])


@pytest.fixture(scope="module")
def replica(small_world, tmp_path_factory):
    """The deployment's class itself, in this process (no Ray): a tiny random checkpoint, a token, and a
    0.5 s request timeout; (replica, an image file)."""
    from dearli.predict.serve import LabelingService
    from dearli.predict.serve_options import ServeOptions
    from dearli.predict.worker import model_payload
    from dearli.training.checkpoint import load_checkpoint

    checkpoint = tiny_checkpoint(tmp_path_factory.mktemp("replica"), small_world,
                                 ["model.inference.test_short_side=64"], record_dataset=True)
    info = load_dataset(small_world)
    options = ServeOptions(token=TOKEN, request_timeout_s=0.5)
    service = LabelingService.func_or_class(model_payload(load_checkpoint(checkpoint, "cpu")),
                                            [c.to_dict() for c in info.categories.categories], options)
    # One event loop for the module, as a replica has: asyncio.run would wait at its end for worker threads
    # that the tests hold on the model's lock.
    loop = asyncio.new_event_loop()
    yield service, info.split("val").records[0].image_path.read_bytes(), loop.run_until_complete
    loop.close()


def call(service, body: bytes, chunks: int = 1, token: str = TOKEN):
    """``service(request)`` with a starlette request whose body arrives in ``chunks`` pieces."""
    from starlette.requests import Request

    pieces = [body[i::chunks] for i in range(chunks)] if chunks > 1 else [body]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(pieces) - 1} for i, p in enumerate(pieces)]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    headers = [(b"content-type", b"image/png"), (b"authorization", f"Bearer {token}".encode())]
    return service(Request({"type": "http", "method": "POST", "headers": headers, "path": "/"}, receive))


def test_a_request_past_its_timeout_gets_503_and_its_work_stops(replica):
    service, image, run = replica
    forwards = []
    hook = service.labeler.model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        assert run(call(service, image)).status_code == 200 and len(forwards) == 1
        with service.labeler.lock:  # another request is labeling: this one waits past its 0.5 s
            response = run(call(service, image))
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert b"not labeled within 0.5 s" in response.body

        async def client_leaves():  # Serve cancels the task of a client that disconnected
            task = asyncio.ensure_future(call(service, image))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        with service.labeler.lock:
            run(client_leaves())
        for _ in range(100):  # the two waiting threads take the lock in turn, see they were cancelled, and stop
            time.sleep(0.02)
            if not service.labeler.lock.locked():
                break
        time.sleep(0.2)
        assert len(forwards) == 1, "work of a timed-out or abandoned request ran the model"
        assert run(call(service, image)).status_code == 200 and len(forwards) == 2
    finally:
        hook.remove()


def test_the_body_limit_counts_while_it_streams_and_the_token_is_checked_first(replica, monkeypatch):
    from dearli.predict import serve as serve_module

    service, image, run = replica
    monkeypatch.setattr(serve_module, "MAX_REQUEST_BYTES", len(image) - 1)
    monkeypatch.setattr(serve_module.read_body, "__defaults__", (len(image) - 1,))
    response = run(call(service, image, chunks=4))  # no content-length: counted as it arrives
    assert response.status_code == 413 and b"exceeds" in response.body
    response = run(call(service, image, token="nope"))
    assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Bearer")


def test_a_new_class_list_is_encoded_outside_the_model_lock_and_never_written(replica, tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    service, image, _ = replica
    monkeypatch.setenv("DEARLI_TEXT_CACHE", str(tmp_path))
    monkeypatch.setattr(service.labeler.model.backbone, "pretrained", "a-tag")  # as a real CLIP: disk cache on
    classes = [{"name": "sky,heaven"}, {"name": "red circle", "isthing": True}]
    prepared = service.labeler.prepare(json.dumps({"image": base64.b64encode(image).decode(),
                                                   "classes": classes}).encode(), "application/json")
    with service.labeler.lock, ThreadPoolExecutor(1) as pool:  # a long request holds the model
        text = pool.submit(service.labeler.text_of, prepared).result(timeout=60)
    assert text.embeddings.shape[0] == 3 and text.synonym_to_class.tolist() == [0, 0, 1]
    assert list(tmp_path.iterdir()) == [], "a request's class list must not be written to disk"
    answer = service.labeler.run(prepared, text)
    assert {s["category_id"] for s in answer["segments_info"]} <= {0, 1}


def test_the_served_path_and_the_evaluation_path_give_one_panoptic_map(replica):
    # Serving upsamples the masks a few queries at a time without a semantic map; evaluation and `dearli predict`
    # upsample all of them at once for both maps: the panoptic maps must be the same, at a size the model never saw.
    from dearli.model.predictor import predict_image

    service, image, _ = replica
    labeler = service.labeler
    big = np.asarray(Image.open(io.BytesIO(image)).convert("RGB").resize((203, 157), Image.BILINEAR))
    thing_ids = labeler.default.thing_ids
    served = predict_image(labeler.model, big, labeler.model_cfg, thing_ids, semantic=False)
    evaluated = predict_image(labeler.model, big, labeler.model_cfg, thing_ids, semantic=True)
    assert served.panoptic.shape == (157, 203) and evaluated.semantic.shape == (157, 203)
    assert served.semantic.size == 0 and len(served.segments) >= 2
    np.testing.assert_array_equal(served.panoptic, evaluated.panoptic)
    assert served.segments == evaluated.segments
