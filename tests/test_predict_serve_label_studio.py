"""``dearli serve`` as a Label Studio ML backend: the labeling config and task-image rules alone, then Ray Serve
on loopback answering ``/health``, ``/setup``, ``/predict`` and ``/webhook`` over real HTTP with the masks its
own ``POST /`` gives, a real Label Studio 1.23 asking it for predictions, and a START_TRAINING event submitted as
a job to a real Ray head."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from _serving import TOKEN, answer_ids, png_of
from _serving import request as send

from dearli.annotation.label_studio import label_config
from dearli.config import load_config
from dearli.data.dataset import load_dataset
from dearli.data.label_studio_rle import decode_mask
from dearli.data.polygon import polygon_mask
from dearli.model.m2f_lang import build_m2f_lang
from dearli.predict.label_studio_backend import Target, parse_label_config
from dearli.predict.labeler import RequestError
from dearli.predict.task_images import ImageSources, parse_hosts
from dearli.training.checkpoint import save_checkpoint

BILLION_LAUGHS = ('<?xml version="1.0"?><!DOCTYPE v [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">]>'
                  '<View><Image name="image" value="$image"/><BrushLabels name="l" toName="image">'
                  '<Label value="&b;"/></BrushLabels></View>')


# -- the labeling config -------------------------------------------------------------------------------------------

def test_the_labeling_config_names_where_predictions_go():
    assert parse_label_config(label_config(["sky", "red circle"])) == Target("label", "image", "image", False,
                                                                             ("sky", "red circle"))
    both = ('<View><Header value="x"/><Image name="img" value="$photo"/>'
            '<PolygonLabels name="poly" toName="img"><Label value="sky"/></PolygonLabels>'
            '<BrushLabels name="brush" toName="other,img"><Label value="sky"/><Label value="grass"/></BrushLabels>'
            '</View>')
    assert parse_label_config(both) == Target("brush", "img", "photo", False, ("sky", "grass"))  # a brush first
    assert parse_label_config(label_config(["sky"], polygons=True)).polygons
    for config, words in ((BILLION_LAUGHS, "document type"), ("<View><Image", "not valid XML"), ("", "missing"),
                          ('<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i"/></View>',
                           "no BrushLabels or PolygonLabels"),
                          ('<View><Image name="i" value="http://x/a.png"/><BrushLabels name="b" toName="i"/></View>',
                           "no BrushLabels or PolygonLabels"), (["not", "xml"], "not a string")):
        with pytest.raises(RequestError) as err:
            parse_label_config(config)
        assert err.value.status == 400 and words in err.value.reason, (config, err.value.reason)


# -- where task images may come from ------------------------------------------------------------------------------

class _Images(http.server.BaseHTTPRequestHandler):
    """Image files, a redirect, a huge declared and a long undeclared body; every request is recorded."""

    image = b""
    seen: list[tuple[str, str | None]] = []
    accepted = "Token right"

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        if self.path == "/image.png" or self.path.startswith("/data/upload/") and \
                self.headers.get("Authorization") == self.accepted:
            self._answer(200, self.image, {"Content-Length": str(len(self.image))})
        elif self.path.startswith("/data/upload/"):
            self._answer(401, b"{}", {"Content-Length": "2"})
        elif self.path == "/redirect":
            self._answer(302, b"", {"Location": "/image.png", "Content-Length": "0"})
        elif self.path == "/huge":
            self._answer(200, b"", {"Content-Length": str(10**9)})
        elif self.path == "/stream":
            self._answer(200, b"x" * 5000, {"Connection": "close"})
        else:
            self._answer(404, b"", {"Content-Length": "0"})

    def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def image_server(image: bytes) -> Iterator[str]:
    """A real HTTP server on a free loopback port (its own thread) serving ``image``; yields its host:port and
    the (path, Authorization header) of every request it gets."""
    handler = type("Images", (_Images,), {"image": image, "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", handler.seen
    finally:
        server.shutdown()
        server.server_close()


def refusal(sources: ImageSources, reference) -> RequestError:
    with pytest.raises(RequestError) as err:
        sources.read(reference)
    assert "\n" not in err.value.reason
    return err.value


def test_task_images_are_read_only_from_where_the_operator_allows(tmp_path):
    image = png_of(np.full((4, 6, 3), 7, np.uint8))
    with image_server(image) as (host, seen), image_server(image) as (other, other_seen):
        label_studio = f"http://{host}"
        sources = ImageSources(parse_hosts(f"{other}, example.org"), label_studio,
                               lambda renew: "Token right" if renew else "Token expired", max_bytes=1000)
        data_uri = "data:image/png;base64," + base64.b64encode(image).decode()
        assert sources.read(data_uri) == image
        # Label Studio's own paths and URLs carry its token, renewed once after a 401
        assert sources.read("/data/upload/3/abc-image.png") == image
        assert [auth for path, auth in seen] == ["Token expired", "Token right"]
        assert sources.read(f"{label_studio}/image.png") == image
        # an allowed host: fetched, and never with the token
        assert sources.read(f"http://{other}/image.png") == image and other_seen == [("/image.png", None)]
        assert refusal(sources, f"http://{other.replace('127.0.0.1', 'localhost')}/image.png").status == 403
        assert refusal(sources, "http://127.0.0.1:1/image.png").status == 403  # another port of an allowed host
        assert refusal(sources, "https://example.org:8443/x.png").status == 403  # only the default port
        # bounds: no redirect followed, the declared and the counted size
        error = refusal(sources, f"http://{other}/redirect")
        assert "redirect" in error.reason and other_seen[-1][0] == "/redirect"
        assert refusal(sources, f"http://{other}/huge").status == 413
        assert refusal(sources, f"http://{other}/stream").status == 413
        assert refusal(sources, f"http://{other}/missing.png").reason.endswith("HTTP 404")
        for reference, words in ((f"data:image/png;base64,{'A' * 2000}", "more than 1000 bytes"),
                                 ("data:image/png;base64,@@@", "not valid base64"), ("data:,abc", "base64"),
                                 ("s3://bucket/image.png", "s3:// URLs are not read"),
                                 ("image.png", "not read"), (7, "not a URL string"),
                                 ("file:///etc/hostname", "--files-root")):
            assert words in refusal(sources, reference).reason, reference

    # local files: only below the root, symbolic links resolved
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a b.png").write_bytes(image)
    (tmp_path / "secret.png").write_bytes(image)
    (root / "images" / "link.png").symlink_to(tmp_path / "secret.png")
    local = ImageSources(files_root=str(root))
    assert local.read(f"file://{root}/images/a%20b.png") == image
    assert local.read("/data/local-files/?d=images/a%20b.png") == image
    for reference in (f"file://{tmp_path}/secret.png", f"file://{root}/images/link.png",
                      "/data/local-files/?d=../secret.png", "/data/local-files/?d=images/link.png"):
        assert refusal(local, reference).status == 403, reference
    assert "--label-studio-url" in refusal(local, "/data/upload/1/x.png").reason
    assert refusal(local, f"file://{root}/images").reason.endswith("is not a file")
    with pytest.raises(ValueError):
        parse_hosts("http://example.org/")


# -- the ML backend routes on Ray Serve -----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_checkpoint(small_world: Path, folder: Path) -> Path:
    cfg = load_config("tiny", [f"data.dataset={small_world}", "model.inference.test_short_side=64",
                               "model.ensemble.alpha_clip=0.4"])
    torch.manual_seed(0)
    model = build_m2f_lang(cfg.model, load_dataset(small_world).categories.synonyms)
    return save_checkpoint(folder, 1, model, cfg)


@pytest.fixture(scope="module")
def backend(ray_local, small_world, tmp_path_factory):
    """Serve on a free loopback port: one replica of a random tiny checkpoint with a token, images of 64×64
    pixels at most, 4 tasks a request, the dataset's folder as --files-root and a real image host in
    --fetch-hosts; (url, checkpoint, model version, image host)."""
    from ray import serve

    from dearli.predict.serve import build_app, start
    from dearli.predict.serve_options import ServeOptions

    checkpoint = tiny_checkpoint(small_world, tmp_path_factory.mktemp("run"))
    version = "dearli-" + hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:12]
    image = load_dataset(small_world).split("val").records[0].image_path.read_bytes()
    with image_server(image) as (host, _):
        options = ServeOptions(max_pixels=64 * 64, token=TOKEN, max_tasks=4, files_root=str(small_world),
                               fetch_hosts=host)
        url = start(build_app(str(checkpoint), None, options), "127.0.0.1", free_port(), options.request_timeout_s)
        yield url, checkpoint, version, host
        serve.shutdown()


def post(url: str, body, token: str | None = TOKEN) -> tuple[int, dict]:
    return send(url, json.dumps(body).encode(), "application/json", token=token)


def data_uri(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def served_masks(url: str, image: bytes) -> tuple[np.ndarray, dict[int, dict]]:
    """dearli's own answer for ``image``: segment ids and {segment id: segment}."""
    status, answer = send(url, image)
    assert status == 200
    return answer_ids(answer), {s["id"]: s for s in answer["segments_info"]}


def test_health_setup_and_predict_answer_the_masks_post_gives(backend, small_world):
    url, _, version, _ = backend
    info = load_dataset(small_world)
    image = info.split("val").records[0].image_path.read_bytes()
    ids, segments = served_masks(url, image)
    assert segments, "a random model that predicts nothing would prove nothing here"

    status, health = send(url + "health", method="GET")
    assert (status, health) == (200, {"status": "UP", "model_class": "dearli", "model_version": version})
    config = label_config(info.categories.names)
    assert post(url + "setup", {"project": "3.1700000000", "schema": config}) == (200, {"model_version": version})
    status, error = post(url + "setup", {"project": "3.1", "schema": label_config(["zebra", "unicorn"])})
    assert status == 400 and "no label" in error["error"]
    assert post(url + "setup", {"project": "3.1", "schema": BILLION_LAUGHS})[0] == 400

    task = {"id": 11, "data": {"image": data_uri(image)}}
    status, answer = post(url + "predict", {"tasks": [task, task], "label_config": config, "project": "3.1",
                                            "params": {"login": None, "password": None, "context": None}})
    assert status == 200 and len(answer["results"]) == 2 and answer["results"][0] == answer["results"][1]
    prediction = answer["results"][0]
    assert prediction["model_version"] == version and prediction["left_out"] == {}
    assert prediction["score"] == pytest.approx(np.mean([s["score"] for s in segments.values()]))
    assert sorted(region["id"] for region in prediction["result"]) == sorted(f"seg{i}" for i in segments)
    for region in prediction["result"]:
        segment = segments[int(region["id"][3:])]
        assert (region["from_name"], region["to_name"], region["type"]) == ("label", "image", "brushlabels")
        assert region["value"]["brushlabels"] == [segment["category_name"]]
        assert (region["original_height"], region["original_width"]) == ids.shape
        np.testing.assert_array_equal(decode_mask(region["value"]["rle"], *ids.shape), ids == segment["id"])

    # the project's own names: its tags, its image key, polygons, and only the classes it has
    kept = segments[min(segments)]["category_name"]
    own = (f'<View><Image name="photo" value="$img"/><PolygonLabels name="shapes" toName="photo">'
           f'<Label value="{kept.upper()}"/><Label value="not a class"/></PolygonLabels></View>')
    status, answer = post(url + "predict", {"tasks": [{"data": {"img": data_uri(image)}}], "label_config": own})
    prediction = answer["results"][0]
    left = [s["category_name"] for s in segments.values() if s["category_name"] != kept]
    assert status == 200 and prediction["left_out"] == {name: left.count(name) for name in left}
    assert prediction["result"] and all(r["type"] == "polygonlabels" and r["from_name"] == "shapes"
                                        and r["to_name"] == "photo" and r["value"]["polygonlabels"] == [kept.upper()]
                                        for r in prediction["result"])
    drawn = np.zeros(ids.shape, bool)
    for region in prediction["result"]:
        points = np.asarray(region["value"]["points"]) * [ids.shape[1] / 100, ids.shape[0] / 100]
        drawn |= polygon_mask(points, *ids.shape)
    kept_mask = np.isin(ids, [i for i, s in segments.items() if s["category_name"] == kept])
    assert (drawn >= kept_mask).all()  # the outlines hold every pixel (holes filled)


def test_every_route_needs_the_token_bearer_or_basic(backend):
    url, _, version, _ = backend
    calls = [("health", None, "GET"), ("setup", {"project": "1.1"}, "POST"), ("webhook", {"action": "x"}, "POST"),
             ("predict", {"tasks": []}, "POST"), ("", None, "GET")]
    for route, body, method in calls:
        data = None if body is None else json.dumps(body).encode()
        for token in (None, "wrong"):
            status, error = send(url + route, data, "application/json", method=method, token=token)
            assert status == 401 and "Bearer" in error["error"], (route, token)
        for user, password, expected in (("labelstudio", TOKEN, 200), ("labelstudio", "wrong", 401),
                                         (TOKEN, "", 401)):
            basic = base64.b64encode(f"{user}:{password}".encode()).decode()
            req = urllib.request.Request(url + route, data=data, method=method, headers={
                "Authorization": f"Basic {basic}", "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as response:
                    status = response.status
            except urllib.error.HTTPError as err:
                status = err.code
            assert status == expected, (route, user, password, status)


def test_bad_tasks_get_an_empty_result_and_bad_requests_a_4xx(backend, small_world):
    url, _, version, host = backend
    image = load_dataset(small_world).split("val").records[0].image_path.read_bytes()
    ids, segments = served_masks(url, image)
    outside = small_world.parent / "outside.png"
    outside.write_bytes(image)
    tasks = [{"data": {"image": data_uri(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)}},
             {"data": {"image": "http://198.51.100.7/image.png"}},
             {"data": {"image": f"file://{outside}"}},
             {"data": {"image": data_uri(png_of(np.zeros((80, 80, 3), np.uint8)))}},  # over --max-pixels
             ]
    status, answer = post(url + "predict", {"tasks": tasks})
    assert status == 200 and len(answer["results"]) == 4
    reasons = [r["error"] for r in answer["results"]]
    assert all(r["result"] == [] and r["model_version"] == version for r in answer["results"])
    for reason, words in zip(reasons, ("not a readable PNG", "not fetched from 198.51.100.7", "outside --files-root",
                                       "exceeds 4096")):
        assert words in reason, reasons
    # images the options allow, in one request with broken tasks: each answered on its own
    path = load_dataset(small_world).split("val").records[0].image_path
    good = [{"data": {"image": f"http://{host}/image.png"}}, {"data": {"image": f"file://{path}"}},
            {"data": {"photo": "x"}}, "not a task"]
    status, answer = post(url + "predict", {"tasks": good})
    assert status == 200 and [bool(r["result"]) for r in answer["results"]] == [True, True, False, False]
    assert answer["results"][0]["result"] == answer["results"][1]["result"]
    assert "no data.image" in answer["results"][2]["error"] and "no data.image" in answer["results"][3]["error"]
    np.testing.assert_array_equal(decode_mask(answer["results"][0]["result"][0]["value"]["rle"], *ids.shape),
                                  ids == int(answer["results"][0]["result"][0]["id"][3:]))

    for body, code, words in (({"tasks": [{"data": {"image": "x"}}] * 5}, 413, "at most 4"),
                              ({"tasks": "all"}, 400, "'tasks'"), ([1, 2], 400, "JSON object"),
                              ({"tasks": [], "label_config": BILLION_LAUGHS}, 400, "document type"),
                              ({"tasks": [], "label_config": "<View/>"}, 400, "no BrushLabels")):
        status, error = post(url + "predict", body)
        assert status == code and words in error["error"], (body, error)
    assert send(url + "predict", b"{not json", "application/json")[0] == 400
    for route in ("predict", "setup", "webhook"):  # what an attacker sends the new routes: 400, never a 500
        for body in (b"[" * 100_000 + b"]" * 100_000, b'{"tasks": NaN}', b'{"tasks": ' + b"9" * 5000 + b"}",
                     b"[1, 2]", b"\xff\xfe"):
            status, error = send(url + route, body, "application/json")
            assert status == 400 and len(error["error"]) <= 200, (route, body[:20], status, error)
    assert send(url + "predict", method="GET")[0] == 405
    assert send(url + "health", b"{}", "application/json")[0] == 405
    assert send(url + "train", b"{}", "application/json")[0] == 404


def test_webhook_events_and_training_that_is_not_configured(backend):
    url, *_ = backend
    status, error = post(url + "webhook", {"action": "START_TRAINING", "project": {"id": 3}})
    assert status == 400 and error["error"].startswith("training is not configured")
    assert post(url + "webhook", {"action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": {}})[1][
        "status"] == "ok"
    assert post(url + "webhook", {"action": "PROJECT_UPDATED", "project": {"id": 3}})[1]["status"] == "ignored"
    assert post(url + "webhook", {"project": {"id": 3}})[0] == 400


# -- a real Label Studio asks for predictions ----------------------------------------------------------------------

def test_label_studio_gets_predictions_from_dearli_serve(backend, label_studio, small_world):
    """Label Studio connects the endpoint as its ML backend (basic auth with the token as password), sends it a task
    whose image it holds (an upload: /data/upload/..., which the endpoint reads back with a personal access token)
    and stores the answer as the task's prediction."""
    import requests
    from ray import serve

    from dearli.predict.label_studio_api import Client
    from dearli.predict.serve import build_app
    from dearli.predict.serve_options import ServeOptions

    url, checkpoint, version, _ = backend
    info = load_dataset(small_world)
    image = info.split("val").records[0].image_path.read_bytes()
    ids, segments = served_masks(url, image)
    assert segments

    options = ServeOptions(max_pixels=64 * 64, token=TOKEN, label_studio_url=label_studio.url,
                           label_studio_token=label_studio.access_token)
    serve.run(build_app(str(checkpoint), None, options), name="dearli-label-studio", route_prefix="/ls")
    try:
        client = Client(label_studio.url, label_studio.access_token)
        project = client.create_project("dearli ML backend", label_config(info.categories.names))
        auth = {"Authorization": client.authorization}
        uploaded = requests.post(f"{label_studio.url}/api/projects/{project}/import", headers=auth, timeout=120,
                                 files={"file": ("val0.png", image, "image/png")})
        assert uploaded.status_code == 201, uploaded.text
        [task] = client.tasks(project)
        assert task["data"]["image"].startswith("/data/upload/")

        backend_url = f"{url}ls"
        refused = requests.post(f"{label_studio.url}/api/ml", headers=auth, timeout=120,
                                json={"url": backend_url, "project": project})
        assert refused.status_code == 400 and "authentication" in refused.text  # no token: not connected
        ml = connect(label_studio, client, backend_url, project)
        assert ml["readable_state"] == "Connected" and ml["model_version"] == version

        asked = requests.post(f"{label_studio.url}/api/dm/actions", headers=auth, timeout=300,
                              params={"id": "retrieve_tasks_predictions", "project": project},
                              json={"selectedItems": {"all": True, "excluded": []}})
        assert asked.status_code == 200, asked.text
        [task] = client.tasks(project)
        [prediction] = task["predictions"]
        assert prediction["model_version"] == version
        assert prediction["result"], post(f"{url}ls/predict", {"tasks": [task]})
        assert prediction["score"] == pytest.approx(np.mean([s["score"] for s in segments.values()]))
        assert sorted(r["id"] for r in prediction["result"]) == sorted(f"seg{i}" for i in segments)
        for region in prediction["result"]:
            segment = segments[int(region["id"][3:])]
            assert region["value"]["brushlabels"] == [segment["category_name"]]
            np.testing.assert_array_equal(decode_mask(region["value"]["rle"], *ids.shape), ids == segment["id"])

    finally:
        serve.delete("dearli-label-studio")


# -- START_TRAINING submits a Ray job -------------------------------------------------------------------------------

def connect(label_studio, client, url: str, project: int) -> dict:
    """Add ``url`` as the project's ML backend, with basic auth (the token as password); its ML backend record."""
    import requests

    answer = requests.post(f"{label_studio.url}/api/ml", headers={"Authorization": client.authorization},
                           timeout=120, json={"url": url, "project": project, "title": "dearli",
                                              "auth_method": "BASIC_AUTH", "basic_auth_user": "labelstudio",
                                              "basic_auth_pass": TOKEN})
    assert answer.status_code == 201, answer.text
    return answer.json()


@pytest.mark.ray
def test_label_studios_train_button_submits_the_train_command_as_a_ray_job(label_studio, small_world, tmp_path):
    """``dearli serve --train-command`` deployed by a job on a real head (token auth, its dashboard's job API) and
    connected to a real Label Studio: its Train button (START_TRAINING at /webhook) submits the command as a Ray job
    for the project, another START_TRAINING while that runs (for it or another project) gets 409 naming it, and the
    job runs the command."""
    import requests
    from _services import BIN, ray_env, ray_head

    from dearli.predict.label_studio_api import Client

    checkpoint = tiny_checkpoint(small_world, tmp_path / "run")
    version = "dearli-" + hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:12]
    home = tmp_path / "home"
    home.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    template = f"{sys.executable} -c \"import time; time.sleep(4); print('trained project {{project}} after " \
               "{model_version}')\""
    with ray_head(home) as address:
        env = ray_env(home)
        deploy = [str(BIN / "ray"), "job", "submit", "--address", address, "--", sys.executable, "-m",
                  "dearli.cli", "serve", "--checkpoint", str(checkpoint), "--port", str(port), "--token", TOKEN,
                  "--cpus-per-replica", "0.5", "--train-command", template, "--jobs-address", address, "--detach"]
        for _ in range(10):  # a head started moments ago may not have its job agent up yet
            done = subprocess.run(deploy, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent to submit job" not in done.stdout + done.stderr:
                break
            time.sleep(3)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
        assert f"serving {checkpoint} at {url}" in done.stdout

        client = Client(label_studio.url, label_studio.access_token)
        project = client.create_project("dearli training", label_config(load_dataset(small_world).categories.names))
        ml = connect(label_studio, client, url, project)
        assert ml["readable_state"] == "Connected" and ml["model_version"] == version
        trained = requests.post(f"{label_studio.url}/api/ml/{ml['id']}/train", timeout=120,
                                headers={"Authorization": client.authorization})
        assert trained.status_code == 200, trained.text
        status, busy = post(url + "webhook", {"action": "START_TRAINING", "project": {"id": project}})
        assert status == 409 and f"project {project} is still" in busy["error"], busy
        job = busy["error"].rsplit("job ", 1)[1]
        status, other = post(url + "webhook", {"action": "START_TRAINING", "project": {"id": project + 1}})
        assert status == 409 and f"job {job}" in other["error"], other  # one training run at a time, any project
        assert post(url + "webhook", {"action": "START_TRAINING", "project": {"id": "7; rm -rf /"}})[0] == 400

        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            state = subprocess.run([str(BIN / "ray"), "job", "status", "--address", address, job], env=env,
                                   capture_output=True, text=True, timeout=60).stdout.lower()
            if any(f"job '{job.lower()}' {word}" in state for word in ("succeeded", "failed", "stopped")):
                break
            time.sleep(2)
        logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", address, job], env=env,
                              capture_output=True, text=True, timeout=60).stdout
        assert f"job '{job.lower()}' succeeded" in state, state + logs
        assert f"trained project {project} after {version}" in logs
        status, again = post(url + "webhook", {"action": "START_TRAINING", "project": {"id": project}})
        assert status == 202 and again["project"] == project and again["job_id"] != job  # the run is over
