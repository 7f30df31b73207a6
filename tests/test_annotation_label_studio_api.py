"""dearli's Label Studio client against a real Label Studio 1.23 server (the ``label_studio`` fixture, over HTTP
only): projects, resumable import of tasks with brush predictions, annotations and export, tokens and
errors."""

from __future__ import annotations

import base64
import copy
import io
import time

import numpy as np
import pytest
from PIL import Image

from dearli.errors import DearliError
from dearli.predict.label_studio_api import Client

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    <Label value="cat" background="#ff0000"/>
    <Label value="dog" background="#0000ff"/>
  </BrushLabels>
</View>"""

# Label Studio's brush RLE of two 8×8 masks (rows 2-4 × columns 3-6, and rows 5-7 × columns 0-1), made by
# label_studio_sdk.converter.brush.encode_rle from the masks repeated as RGBA.
RLE_A = [0, 0, 1, 0, 57, 27, 254, 75, 0, 191, 255, 124, 2, 255, 253, 240, 11, 255, 249, 140, 0]
RLE_B = [0, 0, 1, 0, 57, 27, 254, 159, 0, 159, 255, 11, 128, 79, 255, 133, 192, 39, 255, 194, 224, 0]


def brush(rle: list[int], label: str, region_id: str) -> dict:
    return {"id": region_id, "from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": 8,
            "original_height": 8, "image_rotation": 0, "value": {"format": "rle", "rle": rle, "brushlabels": [label]}}


def task(stem: str, i: int) -> dict:
    region = brush(RLE_A if i % 2 else RLE_B, "cat" if i % 2 else "dog", f"{stem}-0")
    return {"data": {"image": f"/data/{stem}.png", "dearli_stem": stem},
            "predictions": [{"model_version": "dearli-test-1", "score": 0.5 + i / 10, "result": [region]}]}


def test_push_resumes_and_the_predictions_come_back_as_sent(label_studio):
    client = Client(label_studio.url, label_studio.access_token)
    assert client._auth.startswith("Bearer ")  # the personal access token, exchanged for an access token
    project = client.create_project("dearli push test", CONFIG, model_version="dearli-test-1")
    sent = [task(f"img{i}", i) for i in range(3)]
    lines: list[str] = []

    assert client.push_tasks(project, copy.deepcopy(sent), chunk=2, progress=lines.append) == (3, 0)
    assert len(lines) == 2 and "2/3 tasks pushed" in lines[0] and "3/3 tasks pushed" in lines[1], lines
    assert client.push_tasks(project, copy.deepcopy(sent), chunk=2, progress=lines.append) == (0, 3)
    assert "3 tasks there already" in lines[-1]
    # an interrupted push, run again with one more image: only that one goes, once (also when listed twice)
    more = sent + [task("img3", 3), task("img3", 3)]
    assert client.push_tasks(project, more, chunk=2, progress=lines.append) == (1, 4)

    tasks = client.tasks(project)
    assert sorted(t["data"]["dearli_stem"] for t in tasks) == ["img0", "img1", "img2", "img3"]
    by_stem = {t["data"]["dearli_stem"]: t for t in tasks}
    for expected in sent + [task("img3", 3)]:
        got = by_stem[expected["data"]["dearli_stem"]]["predictions"]
        assert len(got) == 1
        assert got[0]["result"] == expected["predictions"][0]["result"]
        assert got[0]["model_version"] == "dearli-test-1"
        assert got[0]["score"] == pytest.approx(expected["predictions"][0]["score"])
    assert client.project(project)["model_version"] == "dearli-test-1"


def test_many_pages_of_tasks_are_listed(label_studio):
    client = Client(label_studio.url, label_studio.legacy_token)
    project = client.create_project("dearli paging test", CONFIG)
    assert client.push_tasks(project, [{"data": {"image": f"/data/{i}.png", "dearli_stem": f"s{i}"}}
                                       for i in range(7)], chunk=3, progress=None) == (7, 0)
    assert sorted(t["data"]["dearli_stem"] for t in client.tasks(project, page_size=3)) == sorted(
        f"s{i}" for i in range(7))


def test_an_annotation_shows_in_the_export(label_studio):
    client = Client(label_studio.url, label_studio.legacy_token)
    assert client._auth.startswith("Token ")  # the legacy token, as its own kind
    project = client.create_project("dearli export test", CONFIG)
    client.push_tasks(project, [task("a", 0), task("b", 1)], progress=None)
    assert client.export(project) == []  # nothing annotated yet
    assert len(client.export(project, all_tasks=True)) == 2
    target = next(t for t in client.tasks(project) if t["data"]["dearli_stem"] == "b")

    first = [brush(RLE_A, "dog", "human-1")]
    annotation = client.annotate(target["id"], first)
    exported = client.export(project)
    assert [t["data"]["dearli_stem"] for t in exported] == ["b"]
    assert [a["result"] for a in exported[0]["annotations"]] == [first]

    second = [brush(RLE_A, "dog", "human-1"), brush(RLE_B, "cat", "human-2")]
    assert client.annotate(target["id"], second, annotation_id=annotation) == annotation
    assert [a["result"] for a in client.export(project)[0]["annotations"]] == [second]


def test_an_expired_access_token_is_renewed(label_studio):
    client = Client(label_studio.url, label_studio.access_token)
    client._auth = "Bearer expired"  # what an access token is after its 5 minutes
    assert isinstance(client.tasks(client.create_project("dearli renew test", CONFIG)), list)
    assert client._auth != "Bearer expired"


def test_a_wrong_token_and_http_errors_are_one_line(label_studio):
    with pytest.raises(DearliError) as err:
        Client(label_studio.url, "not-a-token-of-this-server")
    message = str(err.value)
    assert "refused the token" in message and label_studio.url in message
    assert "\n" not in message and "not-a-token" not in message

    client = Client(label_studio.url, label_studio.legacy_token)
    with pytest.raises(DearliError) as err:
        client.create_project("x", CONFIG)  # Label Studio wants titles of 3 characters or more
    message = str(err.value)
    assert f"POST {label_studio.url}/api/projects: HTTP 400" in message and "title" in message
    assert "\n" not in message
    with pytest.raises(DearliError, match=r"GET \S+/api/projects/987654/export\S*: HTTP 404"):
        client.export(987654)
    with pytest.raises(DearliError, match="no data.dearli_stem"):
        client.push_tasks(client.create_project("dearli stemless", CONFIG), [{"data": {"image": "/x.png"}}])


def test_a_disabled_legacy_token_is_named(label_studio):
    admin = Client(label_studio.url, label_studio.access_token)
    admin._api("POST", "/api/jwt/settings", {"api_tokens_enabled": True, "legacy_api_tokens_enabled": False})
    try:
        with pytest.raises(DearliError, match="legacy token authentication has been disabled"):
            Client(label_studio.url, label_studio.legacy_token)
    finally:
        admin._api("POST", "/api/jwt/settings", {"api_tokens_enabled": True, "legacy_api_tokens_enabled": True})
    Client(label_studio.url, label_studio.legacy_token)  # on again


def test_a_prediction_renders_on_the_labeling_page(label_studio, tmp_path):
    """Logged in by cookie, headless chromium shows the task with the prediction's mask drawn over the image
    (red, the colour of "cat"; the image has no red) and the prediction's model version."""
    from _label_studio import HeadlessChromium, brush_rle, login_cookies

    client = Client(label_studio.url, label_studio.access_token)
    project = client.create_project("dearli render test", CONFIG, model_version="dearli-test-1")
    height, width = 96, 128
    rows, cols = np.mgrid[:height, :width]
    disc = (rows - 48) ** 2 + (cols - 60) ** 2 < 30 ** 2
    png = io.BytesIO()
    Image.new("RGB", (width, height), (0, 120, 200)).save(png, "PNG")
    region = dict(brush(brush_rle(disc), "cat", "disc"), original_width=width, original_height=height)
    client.push_tasks(project, [{
        "data": {"image": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode(), "dearli_stem": "disc"},
        "predictions": [{"model_version": "dearli-test-1", "score": 0.9, "result": [region]}]}], progress=None)
    page = f"{label_studio.url}/projects/{project}/data?tab=0&task={client.tasks(project)[0]['id']}"

    browser = HeadlessChromium(tmp_path / "chromium-profile")
    try:
        browser.open(page, login_cookies(label_studio))
        deadline = time.monotonic() + 120
        while True:  # the labeling app draws a few seconds after the page loads
            shot = browser.screenshot()
            rgb = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(int)
            red = int(((rgb[..., 0] > 120) & (rgb[..., 0] > rgb[..., 1] + 60) & (rgb[..., 0] > rgb[..., 2] + 40)).sum())
            (tmp_path / "task.png").write_bytes(shot)
            if red > 10_000 or time.monotonic() > deadline:
                break
            time.sleep(1)
        text = browser.text()
    finally:
        browser.close()
    assert "dearli-test-1" in text, text[:500]  # the prediction's tab, so not the login page
    assert red > 10_000, f"{red} red pixels: no mask drawn (see {tmp_path / 'task.png'})"


def test_an_unreachable_server_is_one_line():
    from _services import free_port

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(DearliError, match=f"Label Studio at {url} cannot be reached"):
        Client(url, "any")
    with pytest.raises(DearliError, match="must start with http"):
        Client("localhost:8080", "any")
