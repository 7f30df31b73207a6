"""The Ray Train stages on a tiny synthetic world: DeWa warm-up -> Mean Teacher with a teacher actor pool,
and a Train worker killed mid-stage. Each TorchTrainer start costs seconds: the tests are few and each
checks a whole chain of behaviour."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from dearli.cli import main
from dearli.config import load_config
from dearli.data.synth.writer import write_synth_dataset
from dearli.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.ray

TINY = ["model.loss.num_points=256", "data.crop_size=64", "data.short_sides=[64,80]", "data.max_size=160",
        "model.inference.test_short_side=64", "train.log_every=1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_synth_dataset(tmp_path_factory.mktemp("data") / "synth", num_images=16, seed=5, num_val=4,
                               image_size=(64, 64))


@pytest.fixture(scope="module")
def sam_cache(world, tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("cache") / "sam"
    assert main(["cache", "sam", "--dataset", str(world), "--split", "train", "--out", str(out),
                 "--generator", "felzenszwalb"]) == 0
    return out


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def kill_rank_1_after(run: Path, step: int, killed: list[int]) -> threading.Thread:
    """A thread that SIGKILLs the Train worker of rank 1 once ``run``'s metrics reach ``step``."""

    def killer() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            try:
                done = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
                workers = [json.loads(x) for x in (run / "workers.jsonl").read_text().splitlines()]
            except (FileNotFoundError, ValueError):
                done, workers = [], []
            if done and max(done) >= step:
                pid = next(w["pid"] for w in workers if w["rank"] == 1)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    return thread


def test_warmup_then_mean_teacher(world, sam_cache, tmp_path, ray_local):
    """DeWa on 2 workers, then Mean Teacher from its checkpoint with 2 teacher actors, an unreadable unlabeled
    image, and a Train worker SIGKILLed mid-stage: Ray Train restarts the group from the last checkpoint and
    the run ends at the right step with every checkpoint step once. Then a restart after the final checkpoint."""
    from dearli.stages.mean_teacher import run_mean_teacher
    from dearli.stages.warmup import run_warmup

    # A batch of 3 on 2 workers: 2 each (rounded up, as every stage splits a batch), said in the log.
    cfg = load_config("tiny", [f"data.dataset={world}", *TINY, "warmup.max_steps=4", "warmup.batch_size=3",
                               "train.num_workers=2", "train.checkpoint_every=2", "train.threads_per_worker=2"])
    said: list[str] = []
    warm = run_warmup(cfg, tmp_path / "warmup", str(sam_cache), echo=said.append)
    assert any("batch 3 (effective batch 4: 2 per worker on 2 workers) on 2 worker(s)" in line for line in said)
    payload = load_checkpoint(warm["checkpoint"])
    assert payload["step"] == 4 and sorted(p.name for p in (tmp_path / "warmup" / "checkpoints").iterdir()) == [
        "step_0000002.pt", "step_0000004.pt"]
    losses = [m for m in metrics(tmp_path / "warmup") if "loss" in m]
    assert [m["step"] for m in losses] == [1, 2, 3, 4] and all("loss_ce" not in m or m["loss_ce"] == 0 for m in losses)
    workers = [json.loads(line) for line in (tmp_path / "warmup" / "workers.jsonl").read_text().splitlines()]
    assert sorted(w["rank"] for w in workers) == [0, 1] and {w["threads"] for w in workers} == {2}
    costs = [json.loads(line) for line in (tmp_path / "warmup" / "costs.jsonl").read_text().splitlines()]
    assert sorted(c["rank"] for c in costs if c["peak_rss_mb"] > 50) == [0, 1]  # what each worker's loop cost

    # An unreadable unlabeled image is recorded and skipped; the run goes on.
    labeled = set((world / "partitions" / "1_4" / "labeled.txt").read_text().split())
    bad = next(p for p in sorted((world / "images" / "train").iterdir()) if not any(p.stem in x for x in labeled))
    original = bad.read_bytes()
    bad.write_bytes(original[:60])
    run, killed, lines = tmp_path / "ssl", [], []
    ssl_cfg = load_config("tiny", [f"data.dataset={world}", "data.partition=1_4", *TINY, "train.max_steps=12",
                                   "train.num_workers=2", "ssl.teacher_actors=2", "ssl.labeled_batch_size=2",
                                   "ssl.unlabeled_batch_size=2", "ssl.publish_every=2", "ssl.prefetch=2",
                                   "ssl.max_staleness=4", "train.checkpoint_every=3", "train.max_failures=2"])
    thread = kill_rank_1_after(run, 4, killed)
    try:
        result = run_mean_teacher(ssl_cfg, run, init=warm["checkpoint"], echo=lines.append)
    finally:
        bad.write_bytes(original)
    thread.join(timeout=5)
    assert killed, "the worker was never killed"
    assert Path(result["run_dir"]) == run and result["step"] == 12
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.suffix == ".pt") == [
        "step_0000003.pt", "step_0000006.pt", "step_0000009.pt", "step_0000012.pt"]
    workers = [json.loads(x) for x in (run / "workers.jsonl").read_text().splitlines()]
    assert len(workers) == 4, "the worker group was not restarted"
    assert {w["threads"] for w in workers} == {1}, "a Train worker takes one thread per logical CPU it reserves"
    records = metrics(run)
    steps = [m for m in records if "loss" in m]
    numbers = [m["step"] for m in steps]
    # After the restart the steps since the last checkpoint (3, 6 or 9) are repeated, nothing is skipped.
    assert sorted(set(numbers)) == list(range(1, 13)) and numbers[-1] == 12
    assert len(numbers) - 12 <= ssl_cfg.train.checkpoint_every
    # The restarted rank 0 recorded the checkpoint it went back to, it trained on from there, and the driver said so.
    resumes = [i for i, m in enumerate(records) if m.get("resumed")]
    assert len(resumes) == 1 and records[resumes[0]]["step"] in (3, 6, 9), records
    resumed_from = records[resumes[0]]["step"]
    assert records[resumes[0] + 1]["step"] == resumed_from + 1
    assert [x for x in lines if "resumed" in x] == [
        f"[ssl] resumed from checkpoint step {resumed_from} after a restart"]

    assert max(m["staleness_max"] for m in steps) <= 4
    assert all(0.0 <= m["wait_fraction"] <= 1.0 for m in steps)
    versions = [m["teacher_version"] for m in steps]
    assert versions[-1] > versions[0], "the teacher pool never picked up newer EMA weights"
    # An untrained class head predicts "void" for most queries: few or no segments yet, but valid statistics.
    assert all(0.0 <= m["pl/labeled_fraction"] <= 1.0 and m["pl/segments_per_image"] >= 0 for m in steps)
    # The synthetic world's unlabeled images have annotations: the ground truth of the same weak views is
    # counted beside the pseudo-labels (every image has stuff, so at least one true segment per image).
    assert all(m["gt/segments_per_image"] >= 1 and m["pl/things_per_image"] >= 0 for m in steps)
    assert set(result["metrics"]) == {"teacher", "teacher_noens", "student", "student_noens"}
    assert all(0.0 <= v <= 100.0 for s in result["metrics"].values() for v in s.values())
    errors = [json.loads(line) for line in (run / "errors.jsonl").read_text().splitlines()]
    assert {e["stem"] for e in errors} == {bad.stem} and all(e["path"].endswith(bad.name) for e in errors)
    final = load_checkpoint(result["checkpoint"])
    assert final["step"] == 12
    teacher, student = final["model"], final["extra"]["student"]
    key = next(k for k in teacher if k.startswith("transformer_decoder.") and teacher[k].is_floating_point())
    assert not torch.equal(teacher[key], student[key]), "teacher is not an EMA distinct from the student"

    # A restart after the final checkpoint (e.g. the final evaluation died) takes no step and starts no teacher
    # pool, but still evaluates what is missing.
    import shutil

    shutil.rmtree(run / "eval" / "teacher" / "step_0000012")
    lines.clear()
    again = run_mean_teacher(ssl_cfg, run, init=warm["checkpoint"], resume=True, echo=lines.append)
    assert lines[0] == (f"[ssl] {run} holds the last checkpoint (step 12): no step left, so no teacher pool; "
                        "the workers finish the evaluation")
    assert set(again["metrics"]) == set(result["metrics"])
    assert again["metrics"]["student"] == result["metrics"]["student"]  # read back, not evaluated again
    assert (run / "eval" / "teacher" / "step_0000012" / "metrics.json").is_file()
    assert [m["step"] for m in metrics(run) if "loss" in m] == numbers


def test_oracle_teacher_hands_out_the_ground_truth_of_the_weak_view(world, ray_local):
    """ssl.oracle_labels: the teacher pool answers with the truth of the very pixels the student will see."""
    import numpy as np
    import ray

    from dearli.data.dataset import load_dataset
    from dearli.model.m2f_lang import build_m2f_lang
    from dearli.stages.teacher import published_weights, start_teacher_pool, stop_teacher_pool
    from dearli.training.ema import make_teacher
    from dearli.training.pseudo_labels import truth_view

    cfg = load_config("tiny", [f"data.dataset={world}", "data.partition=1_4", *TINY, "ssl.oracle_labels=true"])
    info = load_dataset(world)
    split = info.split("train")
    store, teachers = start_teacher_pool(cfg, 0.25, gpus=0.0)
    try:
        model = make_teacher(build_m2f_lang(cfg.model, info.categories.synonyms))
        ray.get(store.publish.remote(0, published_weights(model, random_backbone=True)))
        stems = [r.stem for r in split.records[:2]]
        result = ray.get(teachers[0].label.remote([{"stem": s, "seed": 11 + i} for i, s in enumerate(stems)], 0))
    finally:
        stop_teacher_pool(store, teachers)
    assert result["stems"] == stems and not result["failed"]
    for i, stem in enumerate(stems):
        record = split.record(stem)
        target = split.load_target(record)
        image = torch.from_numpy(split.load_image(record)).permute(2, 0, 1)
        _, _, truth = truth_view(image, torch.from_numpy(target.masks), torch.from_numpy(target.labels),
                                 info.categories.thing_ids, cfg.data, torch.Generator().manual_seed(11 + i))
        assert np.array_equal(result["panoptic"][i], truth.panoptic.numpy())
        assert result["segments"][i] == truth.segments
    # the statistics still score the teacher's own labels against that truth
    assert result["truth"]["images"] == 2 and result["truth"]["gt_segments"] == sum(
        len(s) for s in result["segments"])
