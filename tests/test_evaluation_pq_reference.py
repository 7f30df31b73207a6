"""The fast PQ path (run maps, joint-run histogram, thread pool) against a plain per-pixel reference.

``reference_counts`` restates panopticapi's ``pq_compute_single_core`` on decoded id maps (``np.unique``
over pixel pairs, Python loops over segments): the way the evaluation worked before run maps. The
generated sets have VOID regions, several crowd segments of a category (only the last listed counts),
predictions lying on crowd and on VOID, GT ids missing from the JSON, JSON areas larger than the pixel
counts, relabelled, merged and spurious predictions, and up to ~110 segments an image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _reference import read_panoptic_ids
from PIL import Image

from dearli.data.coco_format import VOID_ID, id2rgb
from dearli.evaluation.pq import PQStats, collect_stats, pq_compute, pq_from_stats

CATS = [{"id": c, "name": f"c{c}", "isthing": int(c <= 5)} for c in range(1, 9)]  # 1..5 things, 6..8 stuff
OFFSET = 256**3


def _blocky(rng, h: int, w: int, n: int) -> np.ndarray:
    """H×W labels 0..n-1 in rectangles of random sizes (many segments, many runs)."""
    lab = rng.integers(0, n, size=(h // 3 + 1, w // 5 + 1)).repeat(3, 0).repeat(5, 1)[:h, :w]
    for _ in range(n // 5):  # larger rectangles on top, so some segments are big enough to match
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        lab[y:y + rng.integers(4, h // 2), x:x + rng.integers(4, w // 2)] = rng.integers(0, n)
    return lab


def _image(rng, h: int, w: int) -> tuple[np.ndarray, list, np.ndarray, list]:
    """One GT/prediction pair: (GT ids, GT segments, prediction ids, prediction segments)."""
    n = int(rng.integers(60, 260))
    ids = 1 + rng.choice(OFFSET - 1, size=n + 8, replace=False)
    lab = _blocky(rng, h, w, n)
    gt = ids[lab]
    gt[rng.integers(0, h - 8):, : rng.integers(1, w // 3)] = VOID_ID  # a VOID corner
    cats = rng.integers(1, 9, size=n)
    cat_of = dict(zip(ids[:n].tolist(), cats.tolist()))
    present = [int(i) for i in np.unique(gt) if i != VOID_ID]
    unlisted = set(present[:: 17])  # GT ids in the PNG but not in the JSON: never VOID, never matched
    gt_segs = []
    for k, seg_id in enumerate(present):
        if seg_id in unlisted:
            continue
        area = int((gt == seg_id).sum()) + (3 if k % 11 == 0 else 0)  # some JSON areas exceed the pixels
        crowd = int(k % 7 == 0)  # ~1/7 crowd: several of one category in most images
        gt_segs.append({"id": seg_id, "category_id": cat_of[seg_id], "iscrowd": crowd, "area": area})

    pred = np.roll(gt, tuple(rng.integers(-1, 2, size=2)), axis=(0, 1))
    pred[pred == VOID_ID] = ids[n]  # the prediction covers the VOID corner: a segment mostly on VOID
    for j in range(1, 6):  # spurious segments, some on crowd regions
        y, x = rng.integers(0, h - 6), rng.integers(0, w - 6)
        pred[y:y + rng.integers(2, 10), x:x + rng.integers(2, 12)] = ids[n + j]
    merge = rng.choice(present, size=4)
    pred[np.isin(pred, merge[1:])] = merge[0]  # merged predictions
    pred_cats = dict(zip(ids.tolist(), cats.tolist() + rng.integers(1, 9, size=8).tolist()))
    pred_segs = []
    for seg_id in np.unique(pred).tolist():
        cat = pred_cats[seg_id] if rng.random() > 0.1 else int(rng.integers(1, 9))  # some relabelled
        pred_segs.append({"id": seg_id, "category_id": cat, "iscrowd": 0, "area": -1})  # area: ignored
    pred[rng.integers(0, h), :] = VOID_ID  # an unlabelled row in the prediction
    pred_segs = [s for s in pred_segs if (pred == s["id"]).any()]
    return gt, gt_segs, pred, pred_segs


def write_generated_set(root: Path, n_images: int, seed: int, h: int = 64, w: int = 96) -> tuple[str, ...]:
    rng = np.random.default_rng(seed)
    for sub in ("gt", "pred"):
        (root / sub).mkdir(parents=True)
    gt_anns, pred_anns = [], []
    for i in range(n_images):
        g, gs, p, ps = _image(rng, h, w)
        name = f"{i:06d}.png"
        Image.fromarray(id2rgb(g)).save(root / "gt" / name)
        Image.fromarray(id2rgb(p)).save(root / "pred" / name)
        gt_anns.append({"image_id": i, "file_name": name, "segments_info": gs})
        pred_anns.append({"image_id": i, "file_name": name, "segments_info": ps})
    (root / "gt.json").write_text(json.dumps({"annotations": gt_anns, "categories": CATS}))
    (root / "pred.json").write_text(json.dumps({"annotations": pred_anns}))
    return str(root / "gt.json"), str(root / "gt"), str(root / "pred.json"), str(root / "pred")


def _image_reference(g: np.ndarray, gt_segms: dict, p: np.ndarray, pred_segms: dict, stats: dict) -> None:
    """panopticapi's per-image rules on pixel maps; adds [iou, tp, fp, fn] into ``stats`` by category id."""
    for label, area in zip(*np.unique(p, return_counts=True)):
        if label != VOID_ID:
            pred_segms[int(label)]["area"] = int(area)
    pairs, counts = np.unique(g.astype(np.uint64) * OFFSET + p, return_counts=True)
    inter = {(int(q) // OFFSET, int(q) % OFFSET): int(c) for q, c in zip(pairs, counts)}
    gt_matched, pred_matched = set(), set()
    for (gl, pl), c in inter.items():
        if gl not in gt_segms or pl not in pred_segms or gt_segms[gl]["iscrowd"] == 1:
            continue
        if gt_segms[gl]["category_id"] != pred_segms[pl]["category_id"]:
            continue
        union = pred_segms[pl]["area"] + gt_segms[gl]["area"] - c - inter.get((VOID_ID, pl), 0)
        if c / union > 0.5:
            stats[gt_segms[gl]["category_id"]][0] += c / union
            stats[gt_segms[gl]["category_id"]][1] += 1
            gt_matched.add(gl)
            pred_matched.add(pl)
    crowd_of_cat = {}
    for gl, info in gt_segms.items():
        if info["iscrowd"] == 1:
            crowd_of_cat[info["category_id"]] = gl
        elif gl not in gt_matched:
            stats[info["category_id"]][3] += 1
    for pl, info in pred_segms.items():
        if pl in pred_matched:
            continue
        ignored = inter.get((VOID_ID, pl), 0) + inter.get((crowd_of_cat.get(info["category_id"], -1), pl), 0)
        if ignored / info["area"] <= 0.5:
            stats[info["category_id"]][2] += 1


def _class_map(ids: np.ndarray, segms: dict, cls: dict) -> np.ndarray:
    """Each pixel's class (its segment's category; ``len(cls)`` = ignore for VOID and unlisted ids)."""
    return np.vectorize(lambda i: cls[segms[i]["category_id"]] if i in segms else len(cls))(ids)


def reference_counts(gt_json: str, gt_dir: str, pred_json: str, pred_dir: str) -> dict:
    """Category id -> [iou sum, tp, fp, fn] over the set, and the (K+1)² semantic confusion (rows = prediction)."""
    gt, pred = json.loads(Path(gt_json).read_text()), json.loads(Path(pred_json).read_text())
    stats = {c["id"]: [0.0, 0, 0, 0] for c in gt["categories"]}
    cls = {c["id"]: k for k, c in enumerate(sorted(gt["categories"], key=lambda c: c["id"]))}
    conf = np.zeros((len(cls) + 1,) * 2, dtype=np.int64)
    preds = {a["image_id"]: a for a in pred["annotations"]}
    for ann in gt["annotations"]:
        pred_ann = preds[ann["image_id"]]
        g = read_panoptic_ids(Path(gt_dir) / ann["file_name"])
        p = read_panoptic_ids(Path(pred_dir) / pred_ann["file_name"])
        gt_segms = {s["id"]: s for s in ann["segments_info"]}
        pred_segms = {s["id"]: dict(s) for s in pred_ann["segments_info"]}
        _image_reference(g, gt_segms, p, pred_segms, stats)
        np.add.at(conf, (_class_map(p, pred_segms, cls), _class_map(g, gt_segms, cls)), 1)
    return {"stats": stats, "conf": conf}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    files = write_generated_set(tmp_path_factory.mktemp("generated"), n_images=24, seed=7)
    return files, reference_counts(*files)


def test_generated_set_has_the_hard_cases(generated):
    files, _ = generated
    gt = json.loads(Path(files[0]).read_text())
    segs = [s for a in gt["annotations"] for s in a["segments_info"]]
    crowd_cats = [(a["image_id"], s["category_id"]) for a in gt["annotations"] for s in a["segments_info"]
                  if s["iscrowd"]]
    assert len(crowd_cats) > len(set(crowd_cats)) > 5  # several crowd segments of one category in an image
    assert max(len(a["segments_info"]) for a in gt["annotations"]) > 100
    assert (read_panoptic_ids(Path(files[1]) / "000000.png") == VOID_ID).any()
    assert sum(s["area"] > (read_panoptic_ids(Path(files[1]) / "000000.png") == s["id"]).sum()
               for s in gt["annotations"][0]["segments_info"]) > 0
    assert len(segs) > 1000


@pytest.mark.parametrize("workers", [1, 3])
def test_fast_path_counts_equal_the_per_pixel_reference(generated, workers):
    files, ref = generated
    classes = {c["id"]: k for k, c in enumerate(CATS)}
    stats, conf = collect_stats(*files, workers=workers, progress=False, semseg_index=classes)
    for i, cat in enumerate(stats.categories):
        iou, tp, fp, fn = ref["stats"][cat["id"]]
        assert (int(stats.tp[i]), int(stats.fp[i]), int(stats.fn[i])) == (tp, fp, fn), cat["id"]
        assert abs(stats.iou[i] - iou) <= 1e-9
    assert sum(v[1] for v in ref["stats"].values()) > 100  # matches, misses and false positives all occur
    assert sum(v[2] for v in ref["stats"].values()) > 100 and sum(v[3] for v in ref["stats"].values()) > 100
    np.testing.assert_array_equal(conf, ref["conf"])


def test_pq_equals_the_reference_and_does_not_depend_on_threads(generated):
    files, ref = generated
    expected_stats = PQStats(CATS)
    for i, cat in enumerate(CATS):
        iou, tp, fp, fn = ref["stats"][cat["id"]]
        expected_stats.iou[i], expected_stats.tp[i], expected_stats.fp[i], expected_stats.fn[i] = iou, tp, fp, fn
    expected = pq_from_stats(expected_stats)
    one = pq_compute(*files, workers=1, progress=False)
    for group in ("All", "Things", "Stuff"):
        assert one[group]["n"] == expected[group]["n"]
        assert all(abs(one[group][k] - expected[group][k]) <= 1e-9 for k in ("pq", "sq", "rq"))
    for cid, vals in expected["per_class"].items():
        assert all(abs(one["per_class"][cid][k] - vals[k]) <= 1e-9 for k in ("pq", "sq", "rq"))
    # images are summed in GT order whatever the thread count: the same floats, not just close ones
    assert pq_compute(*files, workers=4, progress=False) == one


def test_bench_synthetic_set_equals_the_reference(tmp_path):
    from dearli.bench.evaluate import write_synthetic_set

    write_synthetic_set(tmp_path, num_images=6, height=40, width=56, seed=3, workers=1)
    files = (str(tmp_path / "gt.json"), str(tmp_path / "gt"), str(tmp_path / "pred.json"), str(tmp_path / "pred"))
    ref = reference_counts(*files)
    stats, _ = collect_stats(*files, workers=2, progress=False)
    for i, cat in enumerate(stats.categories):
        iou, tp, fp, fn = ref["stats"][cat["id"]]
        assert (int(stats.tp[i]), int(stats.fp[i]), int(stats.fn[i])) == (tp, fp, fn)
        assert abs(stats.iou[i] - iou) <= 1e-9
