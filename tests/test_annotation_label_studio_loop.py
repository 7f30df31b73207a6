"""The annotation loop against a real Label Studio 1.23 server (the ``label_studio`` fixture): pseudo-labels
pushed by ``dearli export label-studio --url``, read back from the server as the predictions sent, replaced
by the ground truth as an annotator would, exported by the server and read in by ``dearli import
label-studio`` as a partition to train on.

The pseudo-labels are the ground truth of a small synthetic world with mistakes in it (a wrong class, a
missed segment, a spurious one), written through the same commit and ``assemble`` as ``dearli
pseudo-label`` (``_label_studio_factory``): a corrected image differs from its prediction. Masks are encoded
for the annotator and decoded from the server by Label Studio's own SDK, not dearli's codec."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import numpy as np
from _label_studio import brush_rles, decode_brush_rles
from _label_studio_factory import annotator_results, canonical, drop_annotations, ground_truth, write_pseudo_labels
from _panoptic_factory import FakeImage
from PIL import Image

from dearli.cli import main
from dearli.data.coco_format import rgb2id
from dearli.data.dataset import load_dataset
from dearli.data.panoptic import CategoryMap
from dearli.data.synth.writer import write_synth_dataset
from dearli.predict.label_studio_api import Client


def _with_mistakes(stem: str, segment_map: np.ndarray, segments: list[tuple[int, int, int]],
                   categories: CategoryMap) -> FakeImage:
    """The ground truth with a thing of the wrong class, its last segment missed (left unlabeled) and a
    spurious 6×6 thing in the top-left corner; no crowds (a model predicts none)."""
    seg, classes = segment_map.copy(), {seg_id: cat for seg_id, cat, _ in segments}
    things = [c.id for c in categories.categories if c.isthing]
    first_thing = next(seg_id for seg_id, cat, _ in segments if categories.category(cat).isthing)
    classes[first_thing] = next(c for c in things if c != classes[first_thing])
    missed = segments[-1][0]
    seg[seg == missed] = 0
    del classes[missed]
    spurious = max(classes) + 1
    seg[:6, :6] = spurious
    classes[spurious] = things[0]
    present = set(np.unique(seg).tolist())
    return FakeImage(stem, seg, {k: (c, False) for k, c in classes.items() if k in present})


def _published(labels: Path, stem: str) -> tuple[np.ndarray, list[dict]]:
    """A pseudo-label output's segment map of ``stem`` and its segments (with their classes' display names)."""
    data = json.loads((labels / "panoptic.json").read_text())
    classes = CategoryMap.from_dicts(data["categories"], labels)
    annotation = next(a for a in data["annotations"] if Path(a["file_name"]).stem == stem)
    segment_map = rgb2id(np.asarray(Image.open(labels / "panoptic" / annotation["file_name"]).convert("RGB")))
    return segment_map, [{**s, "name": classes.category(s["category_id"]).name} for s in annotation["segments_info"]]


def test_pseudo_labels_go_through_label_studio_and_the_corrections_come_back(label_studio, tmp_path, capsys):
    # the images below the folder the server serves local files from, as a user's would be
    data = write_synth_dataset(label_studio.files_root / "loop", num_images=6, seed=3, num_val=1, image_size=(64, 64),
                               image_format="jpg")
    info = load_dataset(data)
    split, categories = info.split("train"), info.categories
    base = info.partition("1_4").labeled
    pool = [s for s in split.stems if s not in base][:3]
    corrected, untouched = pool[:2], pool[2]  # the annotator submits two tasks and leaves the third
    truth = {stem: ground_truth(split, stem) for stem in pool}
    # the annotator also marks a thing of the first corrected image as a crowd (Label Studio's per-region
    # "crowd" choice of the exported config): the flag must come back as COCO's iscrowd
    segment_map, segments = truth[corrected[0]]
    crowd = next(k for k, (_, cat, _) in enumerate(segments) if categories.category(cat).isthing)
    truth[corrected[0]] = (segment_map, [(s, c, int(k == crowd)) for k, (s, c, _) in enumerate(segments)])
    drop_annotations(split.json_path, set(pool))  # the pool starts unlabeled
    mistaken = [_with_mistakes(stem, *truth[stem], categories) for stem in pool]
    labels = write_pseudo_labels(tmp_path / "pseudo", mistaken, data / "images" / "train",
                                 [c.to_dict() for c in categories.categories])

    # export into a new project (its labeling interface, a Local files storage on the images' folder, the
    # tasks), then the same push again into that project: it resumes, sending none
    out = tmp_path / "label-studio"
    client = Client(label_studio.url, label_studio.access_token)
    export = ["export", "label-studio", str(labels), "--out", str(out), "--document-root", str(label_studio.files_root),
              "--url", label_studio.url, "--token", label_studio.access_token]
    capsys.readouterr()
    assert main([*export, "--create-project", "dearli loop"]) == 0
    printed = capsys.readouterr().out
    project = int(re.search(r"created project (\d+) 'dearli loop'", printed).group(1))
    assert f"resume this push: --project {project})" in printed  # a rerun must not make a second project
    assert f"project {project} at {label_studio.url}: 3 task(s) sent, 0 already there" in printed
    assert client.project(project)["label_config"].strip() == (out / "label_config.xml").read_text().strip()
    (storage,) = client._api("GET", "/api/storages/localfiles", query={"project": project})
    assert storage["path"] == str(data / "images" / "train")
    assert main([*export, "--overwrite", "--project", str(project)]) == 0
    assert "0 task(s) sent, 3 already there" in capsys.readouterr().out

    # what the server holds: one task per image, its prediction decoding to the pseudo-label's segments
    tasks = {t["data"]["dearli_stem"]: t for t in client.tasks(project)}
    assert sorted(tasks) == sorted(pool)
    for stem, task in tasks.items():
        assert task["data"]["image"] == f"/data/local-files/?d=loop/images/train/{stem}.jpg"
        served = urllib.request.urlopen(urllib.request.Request(  # what the labeling page shows
            label_studio.url + task["data"]["image"], headers={"Authorization": f"Token {label_studio.legacy_token}"}))
        assert served.read() == (data / "images" / "train" / f"{stem}.jpg").read_bytes()
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == "dearli-0123456789ab"
        regions = prediction["result"]
        masks = decode_brush_rles([r["value"]["rle"] for r in regions],
                                  [(r["original_height"], r["original_width"]) for r in regions])
        segment_map, segments = _published(labels, stem)
        assert len(regions) == len(segments) > 0
        for region, mask, segment in zip(regions, masks, segments):
            assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == [segment["name"]]
            assert (mask == (segment_map == segment["id"])).all(), (stem, segment)
        assert canonical(segment_map, [(s["id"], s["category_id"]) for s in segments]) != canonical(*truth[stem])

    # the annotator: the prediction becomes the annotation (as when the task is opened), then is redrawn
    drawn = annotator_results({stem: truth[stem] for stem in corrected}, categories, brush_rles)
    for stem in corrected:
        task = tasks[stem]
        first = client.annotate(task["id"], task["predictions"][0]["result"])
        assert client.annotate(task["id"], drawn[stem], annotation_id=first) == first
    export = client.export(project)
    assert sorted(t["data"]["dearli_stem"] for t in export) == sorted(corrected)
    (tmp_path / "export.json").write_text(json.dumps(export))

    assert main(["import", "label-studio", str(tmp_path / "export.json"), "--dataset", str(data), "--partition",
                 "1_4_corrected", "--base-partition", "1_4"]) == 0
    assert "not imported" not in capsys.readouterr().out

    after = load_dataset(data)
    assert after.partition("1_4_corrected").labeled == (*base, *corrected)
    split = after.split("train")
    for stem in corrected:
        assert canonical(*ground_truth(split, stem)) == canonical(*truth[stem]), stem
    assert sum(s.iscrowd for s in split.record(corrected[0]).segments_info) == 1
    assert not split.record(untouched).segments_info  # pushed, never annotated: still unlabeled
    for stem in base:  # the base partition's own annotations are as they were
        assert split.record(stem).segments_info
