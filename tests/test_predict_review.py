"""``dearli review``: the page's order, counts and overlays, and the page in a real headless browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from _faults import Killed, killed_before_rename
from _tiny_model import tiny_checkpoint
from PIL import Image

from dearli.cli import main
from dearli.errors import DataError
from dearli.predict.review import ReviewItem, class_table, overlay, readable, render_page, write_review

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_confidence_class_table_and_overlay():
    segs = [{"id": 1, "category_id": 3, "category_name": "sky", "isthing": False, "score": 0.9, "area": 30},
            {"id": 2, "category_id": 5, "category_name": "red circle", "isthing": True, "score": 0.35, "area": 10}]
    item = ReviewItem("a", None, None, segs)
    assert item.confidence == pytest.approx((0.9 * 30 + 0.35 * 10) / 40)
    assert ReviewItem("b", None, None, []).confidence == 0.0
    table = class_table([item, ReviewItem("c", None, None, segs[1:])])
    assert [(c["name"], c["segments"], c["images"]) for c in table] == [("red circle", 2, 2), ("sky", 1, 1)]
    assert table[0]["histogram"][3] == 2 and sum(table[1]["histogram"]) == 1  # scores 0.35 land in bin 3
    kept, missing = readable([ReviewItem("gone", Path("/nonexistent/a.png"), Path("/nonexistent/a.png"), [])])
    assert kept == [] and missing == ["gone: /nonexistent/a.png not found"]
    ids = np.zeros((4, 4), np.int32)
    ids[:, 2:] = 2
    image = np.zeros((4, 4, 3), np.uint8)
    out = overlay(image, ids, segs)
    assert (out[:, 1] == 255).all()  # the boundary column between segment 0 (unlabelled) and 2
    assert out[0, 3].any() and not out[0, 0].any()  # segment 2 tinted, the unlabelled pixel left alone


@pytest.fixture(scope="module")
def predicted(small_world, tmp_path_factory):
    checkpoint = tiny_checkpoint(tmp_path_factory.mktemp("run"), small_world,
                                 ["model.inference.test_short_side=64", "model.ensemble.alpha_clip=0.4"])
    out = tmp_path_factory.mktemp("pred") / "pred"
    assert main(["predict", "--checkpoint", str(checkpoint), "--dataset", str(small_world), "--out", str(out),
                 "--visualize", "0"]) == 0
    return out, checkpoint


def test_review_page_of_predictions_in_a_browser(predicted, small_world, tmp_path, capsys):
    out, checkpoint = predicted
    page_dir = tmp_path / "review"
    assert main(["review", str(out), "--dataset", str(small_world), "--checkpoint", str(checkpoint),
                 "--out", str(page_dir)]) == 0
    page = (page_dir / "index.html").read_text()
    annotations = json.loads((out / "panoptic.json").read_text())["annotations"]
    stems = [s.name.removesuffix(".png") for s in (out / "panoptic").iterdir()]
    assert all(f'data-stem="{stem}"' in page for stem in stems)
    confidences = [float(v) for v in re.findall(r'data-confidence="([0-9.]+)"', page)]
    assert confidences == sorted(confidences)  # least sure first, without JavaScript too
    assert len(re.findall(r'data-disagreement="([0-9.]+)"', page)) == len(stems) and "disagreement 0." in page
    table = json.loads((page_dir / "review.json").read_text())["classes"]
    assert sum(c["segments"] for c in table) == sum(len(a["segments_info"]) for a in annotations) > 0
    for stem in stems:
        assert Image.open(page_dir / "images" / f"{stem}.png").size == Image.open(out / "panoptic" / f"{stem}.png").size
    before = (page_dir / "index.html").stat().st_mtime_ns
    assert main(["review", str(out), "--dataset", str(small_world), "--out", str(page_dir)]) == 1
    assert "exists already" in capsys.readouterr().err and (page_dir / "index.html").stat().st_mtime_ns == before

    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is part of the test setup (README's test command installs it)"
    user_dir = tmp_path / "chromium-profile"
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={user_dir}", "--dump-dom",
                          (page_dir / "index.html").as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert f"{len(stems)} of {len(stems)} images" in dom  # the page's script ran in the browser
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={user_dir}", "--window-size=1200,900",
                    f"--screenshot={shot}", (page_dir / "index.html").as_uri()], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (900, 1200) and pixels.std() > 10  # drawn, not a blank page


class _Attributes(HTMLParser):
    """Every (tag, attribute, value) of a page, as a browser's parser reads them."""

    def __init__(self):
        super().__init__()
        self.found: list[tuple[str, str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        self.found += [(tag, name, value) for name, value in attrs]


HOSTILE_ID = '1" onmouseover="x'
HOSTILE_STEM = 'a#b?c&d"<e>'


def _hostile_item(folder: Path) -> ReviewItem:
    """One image whose stem, class id and name would break out of an attribute if not escaped."""
    ids = np.zeros((4, 4), np.int32)
    ids[:, 2:] = 7
    Image.fromarray(np.full((4, 4, 3), 90, np.uint8)).save(folder / "picture.png")
    Image.fromarray(np.stack([ids, ids * 0, ids * 0], axis=-1).astype(np.uint8)).save(folder / "label.png")
    segment = {"id": 7, "category_id": HOSTILE_ID, "category_name": "<b>sky</b>", "isthing": False,
               "score": 0.4, "area": 8}
    return ReviewItem(HOSTILE_STEM, folder / "picture.png", folder / "label.png", [segment])


def test_the_page_escapes_every_input_value_and_encodes_links(tmp_path):
    page = render_page([_hostile_item(tmp_path)], 'labels "<x>"')
    parser = _Attributes()
    parser.feed(page)
    assert not [a for a in parser.found if a[1].startswith("on")]  # no injected handler attribute
    values = {(tag, name): value for tag, name, value in parser.found}
    assert values[("a", "data-cls")] == HOSTILE_ID and ("option", "value", HOSTILE_ID) in parser.found
    assert values[("div", "data-classes")] == HOSTILE_ID and values[("div", "data-stem")] == HOSTILE_STEM
    assert values[("img", "src")] == "images/a%23b%3Fc%26d%22%3Ce%3E.png"  # '#', '?' no fragment or query
    assert unquote(values[("img", "src")]) == f"images/{HOSTILE_STEM}.png"
    assert "<b>sky" not in page and "&lt;b&gt;sky&lt;/b&gt;" in page and "<x>" not in page


def test_an_interrupted_review_leaves_no_page_and_an_earlier_page_is_never_touched(tmp_path):
    item, out = _hostile_item(tmp_path), tmp_path / "review"
    with killed_before_rename("index.html"), pytest.raises(Killed):
        write_review([item], out, "labels")
    assert not (out / "index.html").exists() and len(list(out.glob(".index.html.tmp-*"))) == 1
    page = write_review([item], out, "labels")  # the rerun completes and cleans up
    assert sorted(p.name for p in out.iterdir()) == ["images", "index.html", "review.json"]
    assert [p.name for p in (out / "images").iterdir()] == [f"{HOSTILE_STEM}.png"]
    assert json.loads((out / "review.json").read_text())["classes"][0]["category_id"] == HOSTILE_ID
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(DataError, match="exists already"):
        write_review([item], out, "other labels")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before and page == out / "index.html"
