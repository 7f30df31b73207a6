"""Multi-node behaviour on a real two-node Ray cluster on this machine (see tests/_two_nodes.py).

Every driver is a ``dearli`` command run in a subprocess with ``RAY_ADDRESS`` set, from a working
directory standing in for the shared storage (``--workdir`` on a real cluster), with paths relative to it:
the nodes run their workers in other working directories, so a path that only resolves on the driver
breaks here as it would on a cluster. The tests are few and each checks a whole chain.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from _two_nodes import TwoNodeCluster

from dearli.stages.ray_train import train_run_name

pytestmark = [pytest.mark.multinode, pytest.mark.ray]

DEARLI = str(Path(sys.executable).parent / "dearli")
TINY = ["model.loss.num_points=256", "data.crop_size=64", "data.short_sides=[64,80]", "data.max_size=160",
        "model.inference.test_short_side=64", "train.log_every=1"]
# Placement by configuration only: the resources cluster.yaml's GPU nodes offer, one per worker / teacher.
SPREAD_TRAIN = ["train.num_workers=2", "train.worker_resources={dearli_train: 1}", "train.placement_strategy=SPREAD",
                "train.storage_path=ray_storage"]
SSL_SMALL = ["ssl.teacher_actors=2", "ssl.teacher_resources={dearli_teacher: 1}", "ssl.labeled_batch_size=2",
             "ssl.unlabeled_batch_size=2", "ssl.publish_every=2", "ssl.prefetch=1", "ssl.max_staleness=3"]
# What dearli writes: none of it may appear in a node's own folders.
OUTPUT_SUFFIXES = {".parquet", ".pt", ".pkl", ".png", ".jsonl"}


DRIVERS: list[subprocess.Popen] = []  # drivers started in the background, stopped with the cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One two-node cluster for the module (a start costs seconds); the node-loss test comes last."""
    nodes = TwoNodeCluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield nodes.start()
    finally:
        for driver in DRIVERS:  # a test that failed midway leaves its driver running
            if driver.poll() is None:
                driver.kill()
                driver.wait(timeout=30)
        nodes.shutdown()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The shared working directory with the synthetic world in data/synth (16 train images of 64×64, 2 val)."""
    from dearli.data.synth.writer import write_synth_dataset

    root = tmp_path_factory.mktemp("shared")
    write_synth_dataset(root / "data" / "synth", num_images=16, seed=5, num_val=2, image_size=(64, 64))
    return root


def dearli(cluster: TwoNodeCluster, workdir: Path, *args: str, timeout: float = 900) -> str:
    """Run a dearli command as a driver of the cluster; returns its output (stdout + stderr)."""
    out = subprocess.run([DEARLI, *args], cwd=workdir, env=cluster.driver_env(), capture_output=True, text=True,
                         timeout=timeout)
    text = out.stdout + out.stderr
    assert out.returncode == 0, f"dearli {' '.join(args)} failed:\n{text[-4000:]}"
    return text


def start(cluster: TwoNodeCluster, workdir: Path, *args: str) -> subprocess.Popen:
    """Start a dearli command as a driver of the cluster, its output to a log file in the workdir."""
    log = open(workdir / f"driver-{args[0]}-{time.monotonic_ns()}.log", "w+")
    process = subprocess.Popen([DEARLI, *args], cwd=workdir, env=cluster.driver_env(), stdout=log,
                               stderr=subprocess.STDOUT, text=True)
    process.log = log
    DRIVERS.append(process)
    return process


def finish(process: subprocess.Popen, timeout: float = 900) -> str:
    """Wait for a started driver; its output, which must end in success."""
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
    process.log.seek(0)
    text = process.log.read()
    process.log.close()
    assert process.returncode == 0, f"{process.args} failed:\n{text[-4000:]}"
    return text


def wait_for(condition, process: subprocess.Popen, timeout: float = 600) -> None:
    """Poll ``condition`` until it is truthy; fails if the driver ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            finish(process)
            pytest.fail(f"{process.args} ended before the condition held")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def read_metrics(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    """The run's metrics (or other JSON-lines file) so far."""
    try:
        return jsonl(run / name)
    except (FileNotFoundError, ValueError):  # not there yet, or a line being written
        return []


def train_stems(shared: Path) -> list[str]:
    return sorted(p.stem for p in (shared / "data" / "synth" / "images" / "train").iterdir())


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cache_stems(cache: Path) -> list[str]:
    return [s for part in sorted((cache / "parts").glob("part-*.parquet"))
            for s in pq.read_table(part, columns=["stem"]).column("stem").to_pylist()]


def stray_outputs(cluster: TwoNodeCluster) -> list[Path]:
    """Files dearli wrote outside the shared storage: anything in a node's working directory, output files
    in its Ray session folder or TMPDIR, and Ray Train's node-local default ``~/ray_results``."""
    stray = [p for node in cluster.nodes.values() for p in node.cwd.rglob("*")]
    for node in cluster.nodes.values():
        for folder in (node.temp_dir, node.tmp):
            stray += [p for p in folder.rglob("*") if p.is_file() and p.suffix in OUTPUT_SUFFIXES]
            stray += [p for p in folder.rglob("checkpoint_*")]
    home_results = cluster.home / "ray_results"
    return stray + ([home_results] if home_results.exists() else [])


def test_cache_job_loses_a_node_and_warmup_reads_the_cache_on_both_nodes(cluster, shared):
    """A cache job whose actors are pinned to node_b by their resources loses node_b (SIGKILL of all its
    processes) mid-job, waits for the replacement node and ends with every image exactly once, showing one
    line for it, not Ray Data's tracebacks. The warm-up's Train workers, spread over both nodes by their
    resources alone, read that cache on node_a and on the new node_b; every file lands in the shared workdir."""
    cluster.ensure_running()
    names = cluster.node_ids()  # a dead node's id has no resources left to name it by
    cache = shared / "caches" / "sam"
    job = start(cluster, shared, "cache", "sam", "--dataset", "data/synth", "--split", "train", "--out",
                "caches/sam", "--generator", "sam", "--sam-type", "tiny", "--points-per-side", "16",
                # thresholds 0: a random SAM's masks pass them, so the warm-up below has masks to learn from
                "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
                "--images-per-part", "1", "--resources", '{"node_b": 1}')
    wait_for(lambda: cache_stems(cache)[1:] if (cache / "parts").is_dir() else [], job)
    killed_at = cluster.kill_node("node_b")
    assert len(cache_stems(cache)) < 16, "the cache job ended before the node was lost"
    cluster.start_node("node_b")  # the replacement an autoscaler would start
    text = finish(job)
    assert "an actor was lost" in text and "Traceback" not in text, text
    assert sorted(cache_stems(cache)) == train_stems(shared), "not every image exactly once"
    success = json.loads((cache / "_SUCCESS").read_text())
    names.update(cluster.node_ids())
    assert (success["done"], success["failed"]) == (16, 0)
    assert {names[n] for n in success["nodes"]} == {"node_b"}, success
    assert cluster.alive_nodes()["node_b"] in success["nodes"], "the replacement node did not take the rest"
    print(f"\ncache job lost node_b, done {time.time() - killed_at:.1f} s later:\n{text}")

    dearli(cluster, shared, "train", "warmup", "--dataset", "data/synth", "--sam-cache", "caches/sam", "--out",
           "runs/warmup", *TINY, *SPREAD_TRAIN, "warmup.max_steps=2", "warmup.batch_size=2",
           "train.checkpoint_every=2")
    names = cluster.node_ids()
    warm = jsonl(shared / "runs/warmup/workers.jsonl")
    assert sorted(names[w["node_id"]] for w in warm) == ["node_a", "node_b"] and sorted(
        w["rank"] for w in warm) == [0, 1]
    assert [m["step"] for m in jsonl(shared / "runs/warmup/metrics.jsonl") if "loss" in m] == [1, 2]
    # Ray Train's checkpoint is on the configured storage, beside the run directories.
    train_run = shared / "ray_storage" / train_run_name(shared / "runs" / "warmup", "warmup")
    assert [p.name for p in train_run.glob("checkpoint_*/state.pt")] == ["state.pt"]
    assert stray_outputs(cluster) == []


def test_mean_teacher_loses_a_node_mid_run(cluster, shared):
    """SIGKILL every process of node_b mid-run (last test: the node stays dead). Mean Teacher (workers and
    teachers on both nodes) restarts from its last checkpoint on node_a and says so in one line, its lost
    teacher actor is replaced there, and the run ends at the right step with each checkpoint once."""
    cluster.ensure_running()
    names = cluster.node_ids()
    run = shared / "runs" / "ssl_loss"
    trainer = start(cluster, shared, "train", "ssl", "--dataset", "data/synth", "--partition", "1_4", "--out",
                    "runs/ssl_loss", *TINY, *SPREAD_TRAIN, *SSL_SMALL, "train.max_steps=7", "train.checkpoint_every=3",
                    "train.max_failures=2")
    wait_for(lambda: [m for m in read_metrics(run) if m.get("step", 0) >= 4], trainer)
    killed_at = cluster.kill_node("node_b")
    before = [m for m in read_metrics(run) if "loss" in m]
    wait_for(lambda: [w for w in read_metrics(run, "workers.jsonl") if w["time"] >= killed_at][1:], trainer)
    restarted = time.time() - killed_at
    wait_for(lambda: len([m for m in read_metrics(run) if "loss" in m]) > len(before), trainer)
    resumed = time.time() - killed_at
    text = finish(trainer)

    first = [w for w in jsonl(run / "workers.jsonl") if w["time"] < killed_at]
    again = [w for w in jsonl(run / "workers.jsonl") if w["time"] >= killed_at]
    assert {names[w["node_id"]] for w in first} == {"node_a", "node_b"}, first
    assert sorted(w["rank"] for w in again) == [0, 1] and {names[w["node_id"]] for w in again} == {"node_a"}, text
    records = read_metrics(run)
    steps = [m for m in records if "loss" in m]
    assert {names[n] for m in before for n in m["teacher_nodes"]} == {"node_a", "node_b"}
    assert {names[n] for n in steps[-1]["teacher_nodes"]} == {"node_a"}, "the lost teacher was not replaced"
    numbers = [m["step"] for m in steps]
    assert sorted(set(numbers)) == list(range(1, 8)) and numbers[-1] == 7
    # The restarted workers went back to a checkpoint (3, or 6 if the kill came late), the driver said which.
    resumes = [i for i, m in enumerate(records) if m.get("resumed")]
    assert len(resumes) == 1 and records[resumes[0]]["step"] in (3, 6), records
    resumed_from = records[resumes[0]]["step"]
    assert records[resumes[0] + 1]["step"] == resumed_from + 1, records
    assert f"[ssl] resumed from checkpoint step {resumed_from} after a restart" in text, text
    repeated = len(numbers) - 7  # the steps after the checkpoint it went back to
    assert 0 < repeated <= 3, numbers
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == [
        "step_0000003.pt", "step_0000006.pt", "step_0000007.pt"]
    print(f"Mean Teacher lost node_b after step {before[-1]['step']}: workers restarted after {restarted:.1f} s, "
          f"training again after {resumed:.1f} s, {repeated} step(s) repeated\n{text}")
    assert stray_outputs(cluster) == []
