"""A crowd flag ticked on Label Studio's own labeling page (headless chromium against the real server of the
``label_studio`` fixture) comes back from ``dearli import label-studio`` as COCO's ``iscrowd``.

The exported config's per-region "crowd" choice is only shown once a region is selected; the page is driven
as a person would: select the region in the Regions list, tick "crowd", press Submit. The annotation is then
whatever Label Studio's frontend writes, not a result this test composed."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
from _label_studio import HeadlessChromium, login_cookies
from _label_studio_factory import ground_truth, write_pseudo_labels
from _panoptic_factory import FakeImage

from dearli.cli import main
from dearli.data.dataset import load_dataset
from dearli.data.synth.writer import write_synth_dataset
from dearli.predict.label_studio_api import Client


def _until(what: str, probe, timeout_s: float = 90.0, every_s: float = 1.0):
    """``probe()`` until it returns something true (then that), TimeoutError naming ``what`` after the time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(every_s)
    raise TimeoutError(f"Label Studio's page: {what} within {timeout_s:.0f} s")


def _run(browser: HeadlessChromium, script: str):
    return browser.send("Runtime.evaluate", {"expression": script})["result"].get("value")


def _click_last(browser: HeadlessChromium, selector: str, text: str, prefix: bool = False) -> bool:
    """Click the last element of ``selector`` without child elements (``leaf``) or of ``label``/``button``
    whose text is ``text`` (or starts with it)."""
    test = "t.startsWith(want)" if prefix else "t === want"
    css, leaf = ("*", "e.children.length === 0") if selector == "leaf" else (selector, "true")
    return bool(_run(browser, f"""(() => {{ const want = {json.dumps(text)};
        const hits = [...document.querySelectorAll({json.dumps(css)})].filter(e => {{
            const t = e.textContent.trim(); return {leaf} && {test}; }});
        if (!hits.length) return false; hits[hits.length - 1].click(); return true; }})()"""))


def test_a_region_ticked_crowd_on_the_labeling_page_is_imported_as_a_crowd(label_studio, tmp_path, capsys):
    data = write_synth_dataset(label_studio.files_root / "page", num_images=4, seed=5, num_val=1, image_size=(64, 64),
                               image_format="jpg")
    info = load_dataset(data)
    split, categories = info.split("train"), info.categories
    stem = split.stems[-1]
    segment_map, segments = ground_truth(split, stem)
    names = [categories.category(cat).name for _, cat, _ in segments]
    # a thing whose class no other segment of the image has: its name picks its one region in the list
    seg_id, name = next((s, n) for (s, cat, _), n in zip(segments, names)
                        if categories.category(cat).isthing and names.count(n) == 1)
    image = FakeImage(stem, segment_map, {s: (cat, False) for s, cat, _ in segments})
    labels = write_pseudo_labels(tmp_path / "pseudo", [image], data / "images" / "train",
                                 [c.to_dict() for c in categories.categories])
    assert main(["export", "label-studio", str(labels), "--out", str(tmp_path / "ls"), "--document-root",
                 str(label_studio.files_root), "--url", label_studio.url, "--token", label_studio.access_token,
                 "--create-project", "crowd on the page"]) == 0
    project = int(re.search(r"created project (\d+)", capsys.readouterr().out).group(1))
    client = Client(label_studio.url, label_studio.access_token)
    (task,) = client.tasks(project)

    browser = HeadlessChromium(tmp_path / "chromium-profile", width=1280, height=1300)
    try:
        browser.open(f"{label_studio.url}/projects/{project}/data?tab=0&task={task['id']}", login_cookies(label_studio))
        _until(f"the region '{name}' listed and selected",
               lambda: _click_last(browser, "leaf", name) and re.search(rf"\bseg{seg_id}\b", browser.text()),
               every_s=2.0)
        _until("the per-region 'crowd' choice", lambda: _click_last(browser, "label", "crowd", prefix=True))
        _until("the Submit button", lambda: _click_last(browser, "button", "Submit"))
        exported = _until("the submitted annotation in the export",
                          lambda: [t for t in client.export(project) if t.get("annotations")])
    finally:
        browser.close()
    (tmp_path / "export.json").write_text(json.dumps(exported))

    assert main(["import", "label-studio", str(tmp_path / "export.json"), "--dataset", str(data), "--partition",
                 "crowd", "--base-partition", "1_4"]) == 0
    assert "not imported" not in capsys.readouterr().out
    after = load_dataset(data).split("train")
    imported_map, imported = ground_truth(after, stem)
    crowds = [(s, cat) for s, cat, crowd in imported if crowd]
    assert len(crowds) == 1 and categories.category(crowds[0][1]).name == name
    assert np.array_equal(imported_map == crowds[0][0], segment_map == seg_id)
    assert len(imported) == len(segments)  # every other region came back too, none a crowd
    assert Path(data / "partitions" / "crowd" / "labeled.txt").is_file()
