"""The annotation walk on a synthetic world, with the ground truth as the annotator, against a real Label Studio
(``.venv-label-studio``, started here with local-file serving of the world's images):

    suggest -> pseudo-label the suggested images -> bench annotation -> export to Label Studio -> a screenshot
    of a task -> the annotator redraws every suggested image as its ground truth -> export -> import as a
    partition

Each step is the dearli command a user runs (in this process); the annotator is the only simulation: it
submits the ground truth of each task through the API, as ``tests/test_annotation_label_studio_loop.py`` does. Prints
each step's wall time. Then ``dearli train --partition NEW`` trains on the result.

    python tests/label_studio_walk.py --dataset DATASET --checkpoint CKPT --partition 1_8 --budget 25 \\
        --new-partition 1_8_plus25 --work DIR --screenshot docs/label-studio-task.png

The import rewrites the annotations of the suggested images in the dataset's train split (from the
ground truth, through Label Studio: its crowd segments as regions with the per-region "crowd" choice).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _label_studio import HeadlessChromium, brush_rles, label_studio_server, login_cookies  # noqa: E402
from _label_studio_factory import annotator_results, ground_truth  # noqa: E402

from dearli.cli import main  # noqa: E402
from dearli.data.dataset import load_dataset  # noqa: E402
from dearli.predict.label_studio_api import Client  # noqa: E402


def step(name: str, argv: list[str] | None = None, times: dict | None = None):
    """Run ``dearli argv`` (or time the block the caller runs after it) and print the wall time."""
    started = time.monotonic()
    if argv is not None:
        shown = ["***" if k and argv[k - 1] == "--token" else a for k, a in enumerate(argv)]
        print(f"\n$ dearli {' '.join(shown)}", flush=True)
        code = main(argv)
        if code:
            raise SystemExit(f"{name}: exit {code}")
    seconds = time.monotonic() - started
    if times is not None:
        times[name] = seconds
    print(f"[{name}: {seconds:.1f} s]", flush=True)
    return started


def screenshot(server, project: int, task: int, path: Path, work: Path) -> None:
    """Label Studio's labeling page of ``task`` in headless chromium, once the masks are drawn: a PNG of 64
    colours (under 200 KB)."""
    from PIL import Image

    page = f"{server.url}/projects/{project}/data?tab=0&task={task}"
    browser = HeadlessChromium(work / "chromium-profile", width=1280, height=800)
    try:
        browser.open(page, login_cookies(server))
        previous, deadline = None, time.monotonic() + 120
        time.sleep(5)
        while time.monotonic() < deadline:  # the labeling app draws a few seconds after the page loads
            shot = browser.screenshot()
            if shot == previous:
                break
            previous = shot
            time.sleep(3)
        text = browser.text()
    finally:
        browser.close()
    image = Image.open(io.BytesIO(shot)).convert("RGB")
    image.quantize(64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    print(f"screenshot {path} ({path.stat().st_size // 1024} KB); page text starts: {' '.join(text.split())[:300]}")


def main_walk() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--partition", default="1_8")
    parser.add_argument("--budget", type=int, default=25)
    parser.add_argument("--new-partition", required=True)
    parser.add_argument("--work", required=True, help="a new folder for the walk's files")
    parser.add_argument("--screenshot", default=None, metavar="PNG")
    args = parser.parse_args()
    dataset, work, times = Path(args.dataset).resolve(), Path(args.work).resolve(), {}
    work.mkdir(parents=True)

    step("suggest", ["suggest", "--checkpoint", args.checkpoint, "--dataset", str(dataset), "--partition",
                     args.partition, "--budget", str(args.budget), "--out", str(work / "suggest")], times)
    split = load_dataset(dataset).split("train")
    rows = (work / "suggest" / "suggestions.csv").read_text().splitlines()[1:args.budget + 1]
    stems = [row.split(",")[1] for row in rows]
    (work / "suggested.txt").write_text("".join(f"{split.record(s).image_path}\n" for s in stems))
    step("pseudo-label", ["pseudo-label", "--checkpoint", args.checkpoint, "--images", str(work / "suggested.txt"),
                          "--out", str(work / "pseudo"), "--actors", "1"], times)
    step("bench annotation", ["bench", "annotation", "--labels", str(work / "pseudo"), "--dataset", str(dataset),
                              "--suggestions", str(work / "suggest" / "suggestions.csv"), "--top",
                              str(args.budget), "--csv", str(work / "annotation_work.csv")], times)

    images = Path(split.record(stems[0]).image_path).resolve().parent
    env = {"LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
           "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(images.parent)}
    started = time.monotonic()
    with label_studio_server(work / "label-studio", env=env) as server:
        times["label studio start"] = time.monotonic() - started
        step("export", ["export", "label-studio", str(work / "pseudo"), "--out", str(work / "ls")], times)
        started = time.monotonic()
        client = Client(server.url, server.access_token)
        project = client.create_project(f"dearli {args.new_partition}", (work / "ls" / "label_config.xml").read_text())
        client._api("POST", "/api/storages/localfiles", {"project": project, "path": str(images),
                                                         "title": "images", "use_blob_urls": True})
        times["project + storage"] = time.monotonic() - started
        step("push", ["export", "label-studio", str(work / "pseudo"), "--out", str(work / "ls"), "--overwrite",
                      "--url", server.url, "--token", server.access_token, "--project", str(project)], times)
        tasks = {t["data"]["dearli_stem"]: t for t in client.tasks(project)}
        first = tasks[stems[0]]
        reachable = urllib.parse.urljoin(server.url, first["data"]["image"])
        print(f"task {first['id']} image {first['data']['image']} ({reachable})")
        if args.screenshot:
            started = time.monotonic()
            screenshot(server, project, first["id"], Path(args.screenshot), work)
            times["screenshot"] = time.monotonic() - started

        started = time.monotonic()
        truth = {stem: ground_truth(split, stem) for stem in stems}
        drawn = annotator_results(truth, split.categories, brush_rles)
        for stem in stems:
            task = tasks[stem]
            annotation = client.annotate(task["id"], task["predictions"][0]["result"])  # opened: the prediction
            client.annotate(task["id"], drawn[stem], annotation_id=annotation)  # redrawn as the ground truth
        times["annotator (simulated)"] = time.monotonic() - started
        started = time.monotonic()
        export = client.export(project)
        (work / "export.json").write_text(json.dumps(export))
        times["export from Label Studio"] = time.monotonic() - started
        print(f"export: {len(export)} annotated tasks -> {work / 'export.json'}")
    step("import", ["import", "label-studio", str(work / "export.json"), "--dataset", str(dataset), "--partition",
                    args.new_partition, "--base-partition", args.partition], times)
    print("\nwall times: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main_walk())
