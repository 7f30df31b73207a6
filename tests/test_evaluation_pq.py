"""Panoptic quality: parity with panopticapi's own output, its matching rules, errors, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _reference import read_panoptic_ids
from PIL import Image

from dearli.cli import main
from dearli.data.coco_format import id2rgb
from dearli.errors import DataError
from dearli.evaluation.panoptic_io import IdTable, read_panoptic_runs
from dearli.evaluation.pq import PQStats, collect_stats, pq_compute, pq_from_stats

FIXTURES = Path(__file__).parent / "fixtures" / "pq"
CATS = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 2, "name": "grass", "isthing": 0},
    {"id": 3, "name": "car", "isthing": 1},
]


def fixture_files(name: str) -> tuple[str, str, str, str]:
    root = FIXTURES / name
    return str(root / "gt.json"), str(root / "gt"), str(root / "pred.json"), str(root / "pred")


def assert_close_tree(ours, expected, path="", tol=1e-9):
    if isinstance(expected, dict):
        assert set(map(str, ours)) == set(map(str, expected)), path
        ours = {str(k): v for k, v in ours.items()}
        for key, value in expected.items():
            assert_close_tree(ours[str(key)], value, f"{path}/{key}", tol)
    elif isinstance(expected, int) and not isinstance(expected, bool) and path.endswith("/n"):
        assert ours == expected, path
    else:
        assert abs(ours - expected) <= tol, (path, ours, expected)


@pytest.mark.parametrize(("name", "workers"), [("coco", 1), ("ade", 1), ("coco", 2)])
def test_parity_with_panopticapi(name, workers):
    expected = json.loads((FIXTURES / name / "expected.json").read_text())
    ours = pq_compute(*fixture_files(name), workers=workers, progress=False)
    assert set(ours) == {"All", "Things", "Stuff", "per_class"}
    assert_close_tree(ours, expected)
    # per_class keys keep the GT JSON's type (int), like panopticapi
    assert all(isinstance(k, int) for k in ours["per_class"])


def test_ade_fixture_uses_string_ids_and_json_areas():
    gt_json, gt_dir, pred_json, pred_dir = fixture_files("ade")
    gt = json.loads(Path(gt_json).read_text())
    assert all(isinstance(a["image_id"], str) for a in gt["annotations"])
    larger = 0
    for ann in gt["annotations"]:
        ids = read_panoptic_ids(str(Path(gt_dir) / ann["file_name"]))
        for s in ann["segments_info"]:
            pixels = int((ids == s["id"]).sum())
            larger += s["area"] > pixels
            s["area"] = pixels
    assert larger > 0
    # with pixel-counted GT areas the result moves away from panopticapi's: the JSON area is what counts
    expected = json.loads((FIXTURES / "ade" / "expected.json").read_text())
    counted = pq_compute(gt, gt_dir, pred_json, pred_dir, workers=1, progress=False)
    assert abs(counted["All"]["pq"] - expected["All"]["pq"]) > 1e-4


def test_image_ids_are_compared_with_their_type(tmp_path):
    gt = json.loads((FIXTURES / "coco" / "gt.json").read_text())
    pred = json.loads((FIXTURES / "coco" / "pred.json").read_text())
    for ann in pred["annotations"]:
        ann["image_id"] = str(ann["image_id"])
    pred_json = tmp_path / "pred.json"
    pred_json.write_text(json.dumps(pred))
    with pytest.raises(DataError, match="no prediction for the image with id 0") as err:
        pq_compute(gt, FIXTURES / "coco" / "gt", pred_json, FIXTURES / "coco" / "pred", progress=False)
    assert err.value.path == str(pred_json)


# --- hand-made single-image cases ------------------------------------------------------------


def seg(seg_id, cat, area=None, crowd=0):
    out = {"id": seg_id, "category_id": cat, "iscrowd": crowd}
    if area is not None:
        out["area"] = area
    return out


def write_set(root: Path, images, categories=CATS) -> tuple[str, str, str, str]:
    """images: (gt ids, gt segments, pred ids, pred segments); GT areas default to pixel counts."""
    for sub in ("gt", "pred"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    gt_anns, pred_anns = [], []
    for i, (g, gs, p, ps) in enumerate(images):
        g, p = np.atleast_2d(np.array(g)), np.atleast_2d(np.array(p))
        name = f"{i:06d}.png"
        Image.fromarray(id2rgb(g)).save(root / "gt" / name)
        Image.fromarray(id2rgb(p)).save(root / "pred" / name)
        gs = [s if "area" in s else {**s, "area": int((g == s["id"]).sum())} for s in gs]
        gt_anns.append({"image_id": i, "file_name": name, "segments_info": gs})
        pred_anns.append({"image_id": i, "file_name": name, "segments_info": ps})
    (root / "gt.json").write_text(json.dumps({"annotations": gt_anns, "categories": categories}))
    (root / "pred.json").write_text(json.dumps({"annotations": pred_anns}))
    return str(root / "gt.json"), str(root / "gt"), str(root / "pred.json"), str(root / "pred")


def counts(tmp_path, g, gs, p, ps) -> dict:
    stats, _ = collect_stats(*write_set(tmp_path, [(g, gs, p, ps)]), workers=1, progress=False)
    return {cat["id"]: (int(stats.tp[i]), int(stats.fp[i]), int(stats.fn[i]), float(stats.iou[i]))
            for i, cat in enumerate(stats.categories)}


def test_iou_of_exactly_half_is_not_a_match(tmp_path):
    # person (4 px) vs a prediction on 2 of them: IoU = 2 / 4 = 0.5 -> FN + FP, not TP
    c = counts(tmp_path, [1, 1, 1, 1, 2, 2, 2, 2], [seg(1, 1), seg(2, 2)],
               [0, 0, 7, 7, 8, 8, 8, 8], [seg(7, 1), seg(8, 2)])
    assert c[1] == (0, 1, 1, 0.0)
    assert c[2] == (1, 0, 0, 1.0)


def test_iou_above_half_is_a_match(tmp_path):
    c = counts(tmp_path, [1, 1, 1, 1, 2, 2, 2, 2], [seg(1, 1), seg(2, 2)],
               [0, 7, 7, 7, 8, 8, 8, 8], [seg(7, 1), seg(8, 2)])
    assert c[1] == (1, 0, 0, 0.75)


def test_prediction_pixels_on_void_leave_the_union(tmp_path):
    # the prediction covers the person and two VOID pixels: union = 4 + 2 - 2 - 2 = 2 -> IoU 1
    c = counts(tmp_path, [1, 1, 0, 0], [seg(1, 1)], [7, 7, 7, 7], [seg(7, 1)])
    assert c[1] == (1, 0, 0, 1.0)


def test_gt_area_comes_from_the_json(tmp_path):
    # JSON area 5 > 2 pixels: union = 4 + 5 - 2 - 2 = 5 -> IoU 0.4, no match; the prediction lies
    # exactly half on VOID, which is not "more than half": a false positive
    c = counts(tmp_path, [1, 1, 0, 0], [seg(1, 1, area=5)], [7, 7, 7, 7], [seg(7, 1)])
    assert c[1] == (0, 1, 1, 0.0)


def test_unmatched_prediction_mostly_on_void_is_ignored(tmp_path):
    c = counts(tmp_path, [2, 2, 2, 0, 0, 0, 0, 0], [seg(2, 2)], [8, 8, 8, 9, 9, 9, 9, 9], [seg(8, 2), seg(9, 1)])
    assert c[1] == (0, 0, 0, 0.0)
    assert c[2] == (1, 0, 0, 1.0)


def test_unmatched_prediction_on_crowd_of_its_category_is_ignored(tmp_path):
    # crowd person 3; person prediction 9 lies on it (ignored), car prediction 10 too (counted)
    c = counts(tmp_path, [3, 3, 3, 3, 2, 2, 2, 2], [seg(3, 1, crowd=1), seg(2, 2)],
               [9, 9, 9, 10, 8, 8, 8, 8], [seg(9, 1), seg(10, 3), seg(8, 2)])
    assert c[1] == (0, 0, 0, 0.0)  # a crowd segment is never a false negative either
    assert c[3] == (0, 1, 0, 0.0)
    assert c[2] == (1, 0, 0, 1.0)


def test_only_the_last_crowd_segment_of_a_category_counts(tmp_path):
    # panopticapi remembers one crowd segment per category (the last listed): a prediction on the
    # first crowd segment is a false positive there, so it is here
    c = counts(tmp_path, [3, 3, 4, 4, 2, 2], [seg(3, 1, crowd=1), seg(4, 1, crowd=1), seg(2, 2)],
               [9, 9, 0, 0, 8, 8], [seg(9, 1), seg(8, 2)])
    assert c[1] == (0, 1, 0, 0.0)


def test_gt_ids_missing_from_the_json_are_not_void(tmp_path):
    # GT id 5 is not listed: its pixels stay in the union (IoU 2/4 = 0.5, no match) and the
    # prediction is not "on VOID" (a false positive)
    c = counts(tmp_path, [5, 5, 1, 1], [seg(1, 1)], [7, 7, 7, 7], [seg(7, 1)])
    assert c[1] == (0, 1, 1, 0.0)


def test_large_ids_and_many_segments_match_panoptic_rules(tmp_path):
    # random 24-bit ids: the perfect prediction of every segment is a TP with IoU 1
    rng = np.random.default_rng(0)
    ids = rng.choice(256**3 - 1, size=300, replace=False) + 1
    g = ids[rng.integers(0, 300, size=(40, 50))]
    present = np.unique(g)
    segs = [seg(int(i), 1 + int(i) % 3) for i in present]
    c = counts(tmp_path, g, segs, g, segs)
    assert sum(v[0] for v in c.values()) == len(present)
    assert all(v[1] == v[2] == 0 and v[3] == v[0] for v in c.values())


def test_pq_from_stats_leaves_out_absent_classes():
    stats = PQStats(CATS)
    stats.add(np.array([[1.8, 0, 0, 0], [2, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]], dtype=float))
    res = pq_from_stats(stats)
    # person: tp 2, fp 1, fn 1, iou 1.8 -> pq 0.6, sq 0.9, rq 2/3; grass and car never occur
    assert res["All"] == pytest.approx({"pq": 0.6, "sq": 0.9, "rq": 2 / 3, "n": 1})
    assert res["Things"]["n"] == 1
    assert res["Stuff"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
    assert res["per_class"][2] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}


@pytest.mark.parametrize("size", [1, 200, 2000])  # 2000 ids: too many for a hash table, binary search
def test_id_table_lookup_matches_a_dict(size):
    rng = np.random.default_rng(1)
    known = np.unique(np.append(rng.choice(256**3, size=size, replace=False), 0)).astype(np.uint32)
    table = IdTable(known)
    queries = np.concatenate([known, rng.integers(0, 256**3, size=5000)]).astype(np.uint32)
    slots, is_known = table.lookup(queries)
    position = {int(v): i for i, v in enumerate(known)}
    expected = np.array([position.get(int(q), len(known)) for q in queries])
    np.testing.assert_array_equal(slots, expected)
    np.testing.assert_array_equal(is_known, expected < len(known))


# --- errors name the file ------------------------------------------------------------------------


@pytest.fixture
def simple_set(tmp_path):
    return write_set(tmp_path, [([1, 1, 2, 2], [seg(1, 1), seg(2, 2)], [7, 7, 8, 8], [seg(7, 1), seg(8, 2)])])


def rewrite_pred(pred_json: str, segments: list) -> None:
    data = json.loads(Path(pred_json).read_text())
    data["annotations"][0]["segments_info"] = segments
    Path(pred_json).write_text(json.dumps(data))


def test_error_segment_in_png_not_in_json(simple_set):
    rewrite_pred(simple_set[2], [seg(7, 1)])
    with pytest.raises(DataError, match=r"segment ids \[8\] are in the PNG but not in") as err:
        pq_compute(*simple_set, workers=1, progress=False)
    assert err.value.path.endswith("pred/000000.png")


def test_error_segment_in_json_not_in_png(simple_set):
    rewrite_pred(simple_set[2], [seg(7, 1), seg(8, 2), seg(9, 2)])
    with pytest.raises(DataError, match=r"segment ids \[9\].*but not in the PNG") as err:
        pq_compute(*simple_set, workers=1, progress=False)
    assert err.value.path.endswith("pred/000000.png")


def test_error_unknown_category(simple_set):
    rewrite_pred(simple_set[2], [seg(7, 1), seg(8, 42)])
    with pytest.raises(DataError, match="unknown category_id 42") as err:
        pq_compute(*simple_set, workers=1, progress=False)
    assert err.value.path == simple_set[2]


@pytest.mark.parametrize("which", ["gt", "pred"])
def test_error_missing_png(simple_set, which):
    folder = Path(simple_set[1] if which == "gt" else simple_set[3])
    (folder / "000000.png").unlink()
    with pytest.raises(DataError, match="PNG file not found") as err:
        pq_compute(*simple_set, workers=1, progress=False)
    assert err.value.path == str(folder / "000000.png")


def test_error_in_a_worker_process_names_the_file(tmp_path):
    images = [([1, 1, 2, 2], [seg(1, 1), seg(2, 2)], [7, 7, 8, 8], [seg(7, 1), seg(8, 2)])] * 20
    files = write_set(tmp_path, images)
    (Path(files[3]) / "000013.png").unlink()
    with pytest.raises(DataError, match="PNG file not found") as err:
        pq_compute(*files, workers=2, progress=False)
    assert err.value.path.endswith("000013.png")


def test_rgba_png_uses_rgb_and_gray_png_is_rejected(tmp_path):
    ids = np.array([[0, 70000], [123456, 5]])
    rgba = np.concatenate([id2rgb(ids), np.full((2, 2, 1), 255, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_panoptic_ids(str(tmp_path / "a.png")), ids)
    runs = read_panoptic_runs(str(tmp_path / "a.png"))
    np.testing.assert_array_equal(np.repeat(runs.ids, np.diff(runs.starts, append=4)).reshape(2, 2), ids)
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "g.png")
    with pytest.raises(DataError, match="expected an RGB panoptic PNG"):
        read_panoptic_runs(str(tmp_path / "g.png"))


# --- CLI -------------------------------------------------------------------------------------------


def test_cli_json_is_one_object_matching_panopticapi(capsys):
    gt_json, gt_dir, pred_json, pred_dir = fixture_files("ade")
    code = main(["evaluate", "--gt-json", gt_json, "--gt-dir", gt_dir, "--pred-json", pred_json,
                 "--pred-dir", pred_dir, "--json", "--workers", "1", "--no-progress"])
    out = capsys.readouterr()
    assert code == 0
    result = json.loads(out.out)  # fails unless stdout is exactly one JSON document
    assert set(result) == {"All", "Things", "Stuff", "per_class"}
    expected = json.loads((FIXTURES / "ade" / "expected.json").read_text())
    names = {str(c["id"]): c["name"] for c in json.loads(Path(gt_json).read_text())["categories"]}
    for cid, vals in result["per_class"].items():
        assert vals.pop("name") == names[cid]
    assert_close_tree(result, expected)
    assert out.err == ""


def test_cli_table_and_clean_error(capsys, simple_set):
    gt_json, gt_dir, pred_json, pred_dir = simple_set
    args = ["evaluate", "--gt-json", gt_json, "--gt-dir", gt_dir, "--pred-json", pred_json, "--pred-dir", pred_dir,
            "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "All" in out and "100.0" in out  # a perfect prediction
    rewrite_pred(pred_json, [seg(7, 1)])
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("dearli evaluate: error:") and "pred/000000.png" in err


def test_cli_progress_goes_to_stderr_only(capsys):
    gt_json, gt_dir, pred_json, pred_dir = fixture_files("coco")
    assert main(["evaluate", "--gt-json", gt_json, "--gt-dir", gt_dir, "--pred-json", pred_json,
                 "--pred-dir", pred_dir, "--json", "--workers", "1"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["All"]["n"] == 12
    assert "PQ" in out.err and "40/40" in out.err
