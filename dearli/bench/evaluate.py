"""``dearli bench evaluate``: speed of dearli's PQ evaluation against panopticapi's ``pq_compute``.

The benchmark writes a synthetic COCO panoptic GT/prediction set (random stuff bands, thing
ellipses, crowd and VOID regions; predictions shifted, dropped, relabelled and with spurious
segments), then times the evaluators on it and checks that they agree. panopticapi is not on
PyPI: pass ``--reference path/to/panopticapi/evaluation.py`` from a checkout of
cocodataset/panopticapi, or have an importable ``panopticapi`` package. hotcoco (a Rust evaluator
on PyPI, in the ``test`` extras) is timed when it imports and skipped with a note when it does not.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_THING_CATS = 8  # synthetic category ids 1..8 are things, 9..12 stuff
N_STUFF_CATS = 4


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    parser = bench_subparsers.add_parser(
        "evaluate", help="time PQ evaluation against panopticapi's pq_compute",
        description="Write a synthetic panoptic GT/prediction set, time 'dearli evaluate' (pq_compute) on it "
        "and, when available, panopticapi's pq_compute and hotcoco's (if installed, as with the 'test' extras); "
        "after an untimed warm-up round, print min/median/max seconds, images/s and the ratios of the medians "
        "(other / dearli: ≥ 1 means dearli is as fast or faster). The headline dearli number is cold (every PNG "
        "decoded); the 'warm GT cache' line is a repeated evaluation with decoded ground truth kept in "
        "gt_cache_dir, as during training.",
    )
    parser.add_argument("--num-images", type=int, default=300, help="images in the synthetic set (default 300)")
    parser.add_argument("--height", type=int, default=512, help="image height (default 512)")
    parser.add_argument("--width", type=int, default=683, help="image width (default 683)")
    parser.add_argument("--workers", type=int, default=None,
                        help="dearli worker threads (default: the usable CPUs, at most 8); also the processes "
                        "writing the synthetic set")
    parser.add_argument("--reference", default=None, metavar="EVALUATION_PY",
                        help="panopticapi/evaluation.py of a cocodataset/panopticapi checkout (default: import "
                        "'panopticapi' if installed)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="timed rounds (default 5) after one untimed warm-up round; each round runs every "
                        "evaluator once; min, median and max are printed, ratios use the medians")
    parser.add_argument("--no-warm", dest="warm", action="store_false",
                        help="skip the second dearli timing with a filled ground-truth cache (gt_cache_dir)")
    parser.add_argument("--data-dir", default=None,
                        help="write the synthetic set here (a new or empty folder) and keep it, or reuse the "
                        "set an earlier run wrote there; default: a temporary folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the synthetic set")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dearli.errors import ConfigError

    if args.num_images < 1 or args.height < 8 or args.width < 8 or args.repeat < 1:
        raise ConfigError("--num-images and --repeat must be ≥ 1, --height and --width ≥ 8")
    if args.workers is not None and args.workers < 1:
        raise ConfigError("--workers must be ≥ 1")
    reference = load_reference(args.reference)
    with contextlib.ExitStack() as stack:
        if args.data_dir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dearli-bench-eval-")))
        else:
            root = Path(args.data_dir)
        if all((root / name).exists() for name in ("gt.json", "gt", "pred.json", "pred")):
            # a set written by an earlier run: evaluate it as it is (it is never modified)
            args.num_images = len(json.loads((root / "gt.json").read_text())["annotations"])
            print(f"images: {args.num_images}, reusing the set in {root}")
        elif root.exists() and any(root.iterdir()):
            raise ConfigError(f"--data-dir {root} is neither empty nor a set written by this benchmark")
        else:
            t0 = time.perf_counter()
            write_synthetic_set(root, args.num_images, args.height, args.width, args.seed,
                                args.workers or os.cpu_count() or 1)
            print(f"images: {args.num_images} ({args.height}×{args.width}), written in "
                  f"{time.perf_counter() - t0:.1f} s")
        _compare(root, args, reference)
    return 0


def _compare(root: Path, args: argparse.Namespace, reference) -> None:
    """Time every available evaluator in interleaved rounds (fairer on a busy machine), print a table."""
    from dearli.evaluation.pq import default_workers

    files = (str(root / "gt.json"), str(root / "gt"), str(root / "pred.json"), str(root / "pred"))
    workers = default_workers() if args.workers is None else args.workers
    cache_dir = Path(tempfile.mkdtemp(prefix="dearli-gt-cache-"))  # never inside --data-dir: that set stays as it is
    try:
        runners = _runners(files, args.warm, workers, reference, cache_dir)
        results, times = _timed_rounds(args.repeat, runners)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)

    print(f"{args.repeat} timed rounds after 1 untimed warm-up round, evaluators in rotating order; dearli with "
          f"{workers} worker thread(s), cold = every PNG decoded, warm = decoded GT from gt_cache_dir; the others "
          "with their own workers (panopticapi: one process per CPU)")
    print(f"{'evaluator':24s} {'min s':>8s} {'median s':>8s} {'max s':>8s} {'images/s':>9s}  "
          f"{'max |ΔPQ/SQ/RQ| vs dearli (cold)':>32s}")
    medians = {name: statistics.median(t) for name, t in times.items()}
    ours = results["dearli (cold)"]
    for name, t in times.items():
        diff = "" if name == "dearli (cold)" else f"{_max_difference(ours, results[name]):.1e}"
        print(f"{name:24s} {min(t):8.4f} {medians[name]:8.4f} {max(t):8.4f} {args.num_images / medians[name]:9.1f}  "
              f"{diff:>32s}")
    for other in ("panopticapi", "hotcoco"):
        for mine in (k for k in medians if k.startswith("dearli") and other in medians):
            print(f"ratio {other} / {mine} (median seconds; ≥ 1: dearli as fast or faster): "
                  f"{medians[other] / medians[mine]:.2f}")


def _runners(files: tuple, warm: bool, workers: int, reference, cache_dir: Path) -> dict:
    """Name -> zero-argument callable returning a pq_compute-style result, for each available evaluator."""
    from dearli.evaluation.pq import pq_compute

    runners = {"dearli (cold)": lambda: pq_compute(*files, workers=workers, progress=False)}
    if warm:  # the untimed warm-up round fills the cache: the timed rounds are repeated evaluations
        runners["dearli (warm GT cache)"] = lambda: pq_compute(
            *files, workers=workers, progress=False, gt_cache_dir=cache_dir)
    if reference is None:
        print("panopticapi: reference not found (pass --reference path/to/panopticapi/evaluation.py)")
    else:
        runners["panopticapi"] = _panopticapi_call(reference.pq_compute, files)
    try:
        from hotcoco.panoptic import pq_compute as hotcoco_pq
    except ImportError:
        print("hotcoco: not installed (optional; pip install -e '.[test]' brings it)")
    else:
        runners["hotcoco"] = _panopticapi_call(hotcoco_pq, files)
    return runners


def _panopticapi_call(fn, files):
    """panopticapi's argument order is (gt_json, pred_json, gt_folder, pred_folder)."""
    gt_json, gt_dir, pred_json, pred_dir = files
    return lambda: fn(gt_json, pred_json, gt_dir, pred_dir)


def _timed_rounds(repeat: int, runners: dict) -> tuple[dict, dict]:
    """One untimed warm-up round, then ``repeat`` timed ones; returns (last result, list of seconds) per name.

    The warm-up pays each evaluator's imports and first-call costs and brings the PNGs into the page
    cache; the order of the evaluators rotates from round to round, so none always runs after the
    same neighbour (a busy machine or a heated-up CPU then weighs on each alike).
    """
    names = list(runners)
    results, times = {}, {name: [] for name in names}
    for round_index in range(repeat + 1):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            with _quiet_stdout():
                t0 = time.perf_counter()
                results[name] = runners[name]()
                seconds = time.perf_counter() - t0
            if round_index:
                times[name].append(seconds)
    return results, times


@contextlib.contextmanager
def _quiet_stdout():
    """Silence the evaluators' own printing, also from native code and forked workers (fd level)."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def _max_difference(ours: dict, theirs: dict) -> float:
    worst = 0.0
    for group in ("All", "Things", "Stuff"):
        for key in ("pq", "sq", "rq"):
            worst = max(worst, abs(ours[group][key] - float(theirs[group][key])))
    for cat_id, vals in ours["per_class"].items():
        other = theirs["per_class"].get(cat_id, theirs["per_class"].get(str(cat_id)))
        if other is None:
            return float("inf")
        worst = max(worst, *(abs(vals[k] - float(other[k])) for k in ("pq", "sq", "rq")))
    return worst


def load_reference(path: str | None):
    """panopticapi's evaluation module from a checkout path, or the installed package, or None."""
    from dearli.errors import DataError

    if path is None:
        try:
            return importlib.import_module("panopticapi.evaluation")
        except ImportError:
            return None
    file = Path(path)
    if file.is_dir():
        file = file / "panopticapi" / "evaluation.py" if (file / "panopticapi").is_dir() else file / "evaluation.py"
    if not file.is_file() or file.parent.name != "panopticapi":
        raise DataError(path, "expected panopticapi/evaluation.py inside a cocodataset/panopticapi checkout")
    sys.path.insert(0, str(file.parent.parent.resolve()))  # its own 'from panopticapi.utils import ...' needs this
    return importlib.import_module("panopticapi.evaluation")


def write_synthetic_set(root: Path, num_images: int, height: int, width: int, seed: int, workers: int) -> None:
    """Write gt.json, gt/, pred.json, pred/ with ``num_images`` random panoptic pairs."""
    (root / "gt").mkdir(parents=True, exist_ok=True)
    (root / "pred").mkdir(exist_ok=True)
    jobs = [(root, i, height, width, seed) for i in range(num_images)]
    if workers > 1:
        with multiprocessing.get_context().Pool(workers) as pool:
            anns = pool.map(_write_pair, jobs, chunksize=8)
    else:
        anns = [_write_pair(job) for job in jobs]
    categories = [{"id": c, "name": f"class{c}", "isthing": int(c <= N_THING_CATS)}
                  for c in range(1, N_THING_CATS + N_STUFF_CATS + 1)]
    images = [{"id": i, "file_name": f"{i:06d}.jpg", "height": height, "width": width} for i in range(num_images)]
    gt = {"images": images, "annotations": [a[0] for a in anns], "categories": categories}
    (root / "gt.json").write_text(json.dumps(gt))
    (root / "pred.json").write_text(json.dumps({"annotations": [a[1] for a in anns]}))


def _write_pair(job) -> tuple[dict, dict]:
    from PIL import Image

    from dearli.data.coco_format import id2rgb

    root, index, height, width, seed = job
    rng = np.random.default_rng([seed, index])
    gt_lab, gt_cats, crowd = _gt_labels(rng, height, width)
    pred_lab, pred_cats = _perturb(rng, gt_lab, gt_cats)
    anns = []
    for kind, lab, cats in (("gt", gt_lab, gt_cats), ("pred", pred_lab, pred_cats)):
        # random 24-bit ids, like the colour-derived ids of COCO panoptic files; label 0 stays VOID
        ids = np.concatenate([[0], 1 + rng.choice(256**3 - 1, size=len(cats) - 1, replace=False)])
        area = np.bincount(lab.ravel(), minlength=len(cats))
        Image.fromarray(id2rgb(ids[lab])).save(root / kind / f"{index:06d}.png")
        segs = [{"id": int(ids[k]), "category_id": int(cats[k]), "iscrowd": int(kind == "gt" and k in crowd),
                 "area": int(area[k])} for k in range(1, len(cats)) if area[k] > 0]
        anns.append({"image_id": index, "file_name": f"{index:06d}.png", "segments_info": segs})
    return anns[0], anns[1]


def _gt_labels(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, list[int], set[int]]:
    """H×W segment labels (0 = VOID), the category of each label and the crowd labels."""
    yy, xx = np.mgrid[0:h, 0:w]
    angle = rng.uniform(-0.5, 0.5)
    proj = yy * np.cos(angle) + xx * np.sin(angle)
    cuts = np.sort(rng.uniform(proj.min(), proj.max(), size=rng.integers(2, 5)))
    lab = (np.digitize(proj, cuts) + 1).astype(np.int32)  # stuff bands 1..len(cuts)+1
    cats = [0] + [int(c) for c in rng.integers(N_THING_CATS + 1, N_THING_CATS + N_STUFF_CATS + 1, len(cuts) + 1)]
    for _ in range(rng.integers(5, 25)):
        _paint_ellipse(rng, lab, len(cats), yy, xx)
        cats.append(int(rng.integers(1, N_THING_CATS + 1)))
    crowd = {len(cats) - 1} if rng.random() < 0.3 else set()
    y0, x0 = rng.integers(0, h - h // 8), rng.integers(0, w - w // 8)
    lab[y0:y0 + h // 10, x0:x0 + w // 10] = 0  # a VOID patch
    return lab, cats, crowd


def _paint_ellipse(rng: np.random.Generator, lab: np.ndarray, value: int, yy: np.ndarray, xx: np.ndarray) -> None:
    h, w = lab.shape
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    ry, rx = rng.uniform(0.03, 0.2) * h, rng.uniform(0.03, 0.2) * w
    y0, y1 = int(max(cy - ry, 0)), int(min(cy + ry + 1, h))
    x0, x1 = int(max(cx - rx, 0)), int(min(cx + rx + 1, w))
    inside = ((yy[y0:y1, x0:x1] - cy) / ry) ** 2 + ((xx[y0:y1, x0:x1] - cx) / rx) ** 2 <= 1
    lab[y0:y1, x0:x1][inside] = value


def _perturb(rng: np.random.Generator, gt: np.ndarray, gt_cats: list[int]) -> tuple[np.ndarray, list[int]]:
    """A plausible prediction: shifted, some segments dropped or relabelled, a few spurious ones."""
    lab = np.roll(gt, tuple(rng.integers(-6, 7, size=2)), axis=(0, 1)).copy()
    cats = list(gt_cats)
    for k in range(1, len(cats)):
        r = rng.random()
        if r < 0.1:
            lab[lab == k] = 0  # missed
        elif r < 0.2:
            cats[k] = int(rng.integers(1, N_THING_CATS + N_STUFF_CATS + 1))  # wrong class
    yy, xx = np.mgrid[0:gt.shape[0], 0:gt.shape[1]]
    for _ in range(rng.integers(0, 4)):
        _paint_ellipse(rng, lab, len(cats), yy, xx)
        cats.append(int(rng.integers(1, N_THING_CATS + 1)))
    return lab, cats
