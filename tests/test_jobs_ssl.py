"""The main job ``jobs/ssl.py``: run as users run it (its name shadows the standard library's ``ssl``), run
choice and configuration of a pipeline run, and end to end as a Ray job on a local head logging to a real
MLflow server."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _services import BIN, ray_env, ray_head
from mlflow.tracking import MlflowClient

from dearli.config_io import to_dict
from dearli.data.synth.writer import write_synth_dataset
from dearli.errors import ConfigError
from dearli.stages import registry, tracking
from dearli.stages.pipeline import PipelineOptions, build_config, choose_run, parse_options, save_run_config
from dearli.training.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
# A few steps of everything on a 16-image world: the job's machinery, not its accuracy.
TINY = ["--preset", "tiny", "--num-images", "16", "--val-images", "4", "--partition", "1_4",
        "warmup.max_steps=2", "warmup.batch_size=2", "train.max_steps=2", "train.batch_size=2",
        "ssl.labeled_batch_size=1", "ssl.unlabeled_batch_size=1", "ssl.publish_every=1", "ssl.max_staleness=4",
        "model.loss.num_points=256", "train.log_every=1", "data.crop_size=64", "model.inference.test_short_side=64"]
SYNTH = {"num_images": 8, "seed": 2, "num_val": 2}  # conftest's synth fixture
STAGES = {"cache", "warmup", "ssl", "evaluate"}
STEP_METRICS = {"loss", "loss_ce", "loss_mask", "loss_dice", "grad_norm", "lr", "images_per_s", "eta_s", "seconds"}
SSL_STEP_METRICS = {"loss_sup", "loss_unsup", "staleness", "staleness_max", "wait_fraction", "relabelled",
                    "teacher_version", "pl/segments_per_image", "pl/labeled_fraction", "pl/mean_confidence"}


def run_job(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python jobs/ssl.py ...`` from the repository root, exactly as the README runs it."""
    return subprocess.run([sys.executable, "jobs/ssl.py", *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=600)


def test_help_works_as_users_run_it():
    done = run_job("--help")
    assert done.returncode == 0, done.stderr
    for option in ("--dataset", "--partition", "--preset", "--workdir", "--experiment", "--run-name", "--resume",
                   "KEY=VALUE"):
        assert option in done.stdout


def test_dry_run_imports_mlflow_with_the_standard_ssl(synth, tmp_path):
    # mlflow -> requests -> urllib3 -> ssl: with jobs/ on sys.path that import would find jobs/ssl.py
    workdir = tmp_path / "work"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = run_job("--dry-run", "--workdir", str(workdir), "--dataset", str(synth), "--sam-generator",
                   "felzenszwalb", "optim.lr=0.002", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"run: {workdir / 'runs' / 'ssl_000'} (new)" in done.stdout
    assert f"MLflow: sqlite:///{tmp_path / 'mlflow.db'} (reachable)" in done.stdout
    assert re.search(r"^  lr: 0\.002$", done.stdout, re.MULTILINE)
    assert not (workdir / "runs").exists()  # a dry run runs nothing


def test_run_choice_new_named_and_resumed(tmp_path):
    runs = tmp_path / "runs"
    assert choose_run(runs, None, False) == ("ssl_000", runs / "ssl_000")
    with pytest.raises(ConfigError, match="no earlier run"):
        choose_run(runs, None, True)
    (runs / "ssl_000").mkdir(parents=True)
    (runs / "ssl_000" / "config.yaml").write_text("{}\n")
    assert choose_run(runs, None, False) == ("ssl_001", runs / "ssl_001")  # a new run never reuses a name
    assert choose_run(runs, None, True) == ("ssl_000", runs / "ssl_000")  # --resume: the latest run
    assert choose_run(runs, "ssl_000", False) == ("ssl_000", runs / "ssl_000")  # same name continues
    assert choose_run(runs, "mine", False) == ("mine", runs / "mine")
    with pytest.raises(ConfigError, match="no run 'mine'"):
        choose_run(runs, "mine", True)
    # a started run takes its directory at once: two runs started together get different names
    claimed = [choose_run(runs, None, False, claim=True) for _ in range(2)]
    assert claimed == [("ssl_001", runs / "ssl_001"), ("ssl_002", runs / "ssl_002")]
    assert all(path.is_dir() for _, path in claimed)


def test_options_take_overrides_anywhere():
    opts = parse_options(["optim.lr=0.01", "--run-name", "a1", "train.max_steps=5", "--resume"])
    assert (opts.run_name, opts.resume, opts.overrides) == ("a1", True, ("optim.lr=0.01", "train.max_steps=5"))
    assert opts.dataset is None and opts.partition == "1_8" and opts.preset == "synth"
    with pytest.raises(SystemExit):
        parse_options(["--run-name", "../elsewhere"])


def test_config_of_a_run(synth, tmp_path):
    opts = PipelineOptions(dataset=str(synth), preset="tiny", sam_generator="felzenszwalb", partition="1_4",
                           overrides=("optim.lr=0.01", "train.storage_path=s3://bucket/train"))
    cfg, generator = build_config(opts, synth, tmp_path, "run_a")
    assert generator == "felzenszwalb" and cfg.data.dataset == str(synth) and cfg.data.partition == "1_4"
    assert cfg.optim.lr == 0.01
    assert cfg.train.storage_path == "s3://bucket/train/run_a"  # a shared Train storage: one folder per run
    caches = tmp_path / "caches"
    assert Path(cfg.cache.sam_cache).parent.parent == caches and Path(cfg.cache.clip_cache).parent.parent == caches
    # other CLIP settings: another CLIP cache, the same SAM cache
    other, _ = build_config(dataclasses.replace(opts, overrides=("model.inference.test_short_side=96",)), synth,
                            tmp_path, "run_b")
    assert other.cache.sam_cache == cfg.cache.sam_cache and other.cache.clip_cache != cfg.cache.clip_cache
    # a cache the user names is used as it is
    mine, _ = build_config(dataclasses.replace(opts, overrides=("cache.sam_cache=s3://b/sam",)), synth, tmp_path,
                           "run_c")
    assert mine.cache.sam_cache == "s3://b/sam"
    # a real dataset needs SAM weights (or an explicit generator / cache)
    with pytest.raises(ConfigError, match="cache.sam_checkpoint"):
        build_config(dataclasses.replace(opts, sam_generator=None), synth, tmp_path, "run_d")


def test_a_continued_run_keeps_its_configuration(synth, tmp_path):
    opts = PipelineOptions(dataset=str(synth), preset="tiny", sam_generator="felzenszwalb")
    cfg, _ = build_config(opts, synth, tmp_path, "run")
    save_run_config(cfg, tmp_path / "run")
    save_run_config(cfg, tmp_path / "run")  # same configuration: fine
    changed, _ = build_config(dataclasses.replace(opts, overrides=("optim.lr=0.5", "ssl.ema_decay=0.9")), synth,
                              tmp_path, "run")
    with pytest.raises(ConfigError, match=r"optim\.lr, ssl\.ema_decay.*--run-name"):
        save_run_config(changed, tmp_path / "run")


def test_a_run_saved_before_a_field_existed_continues(synth, tmp_path):
    """A config.yaml written before a field was added (here model.ensemble.on_valid_mask) is the same
    configuration when the field takes its default: the run continues, and the old file is left as it is."""
    import yaml

    opts = PipelineOptions(dataset=str(synth), preset="tiny", sam_generator="felzenszwalb")
    cfg, _ = build_config(opts, synth, tmp_path, "run")
    values = to_dict(cfg)
    del values["model"]["ensemble"]["on_valid_mask"]
    old = tmp_path / "run" / "config.yaml"
    old.parent.mkdir()
    old.write_text(yaml.safe_dump(values, sort_keys=False))
    before = old.read_text()
    save_run_config(cfg, tmp_path / "run")
    assert old.read_text() == before
    values["model"]["ensemble"]["alpha_clip"] = 0.25  # a real difference is still refused, by name
    old.write_text(yaml.safe_dump(values, sort_keys=False))
    with pytest.raises(ConfigError, match=r"\(model\.ensemble\.alpha_clip\)"):
        save_run_config(cfg, tmp_path / "run")


def submit(address: str, home: Path, mlflow_url: str, *args: str) -> subprocess.CompletedProcess:
    """``ray job submit`` of jobs/ssl.py from the repository root, as the README does it."""
    runtime_env = {"excludes": [".venv", ".git", "runs"], "env_vars": {"MLFLOW_TRACKING_URI": mlflow_url}}
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
           "--runtime-env-json", json.dumps(runtime_env), "--", "python", "jobs/ssl.py", *args]
    for wait in (10, 20, 0):
        done = subprocess.run(cmd, cwd=REPO, env=ray_env(home), capture_output=True, text=True, timeout=1800)
        # A head started moments ago (on a busy machine) may not have its job agent up yet: Ray says so and
        # asks to try again later, as a user would.
        if "No available agent to submit job" not in done.stderr + done.stdout or not wait:
            return done
        time.sleep(wait)
    return done


def final_metric(log: str, variant: str) -> float:
    match = re.search(rf"^final {variant}: PQ (\d+\.\d+),", log, re.MULTILINE)
    assert match, log[-4000:]
    return float(match.group(1))


@pytest.mark.ray
def test_ray_job_runs_the_pipeline_into_mlflow(mlflow_url, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    workdir = tmp_path / "work"
    args = ["--workdir", str(workdir), "--experiment", "job-e2e", "--model-name", "dearli-job", *TINY]
    home = tmp_path / "home"  # the Ray token file of the README's sequence goes here
    home.mkdir()
    with ray_head(home) as address:
        first = submit(address, home, mlflow_url, *args)
        assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-2000:]
        again = submit(address, home, mlflow_url, *args, "--run-name", "ssl_000")  # the same run continues
        assert again.returncode == 0, again.stdout[-6000:] + again.stderr[-2000:]
    assert "warmup: done before" in again.stdout and "ssl: done before" in again.stdout
    # what each stage cost, in the log and in stages.json (a continued run keeps the first run's figures)
    costs = json.loads((workdir / "runs" / "ssl_000" / "stages.json").read_text())["costs"]
    assert set(costs) == {"cache", "warmup", "ssl", "evaluate"}
    assert all(c["seconds"] > 0 and c["driver_peak_mb"] > 50 for c in costs.values())
    assert costs["warmup"]["worker_peak_mb"] > 50 and costs["ssl"]["teacher_peak_mb"] > 50
    assert re.search(r"cost of ssl: \d+ s; peak memory: driver \d+ MiB, Train worker \d+ MiB, teacher actor \d+ MiB",
                     first.stdout)
    assert (workdir / "datasets" / "synth_16_4" / "dataset.yaml").is_file()

    client = MlflowClient(mlflow_url)
    experiment = client.get_experiment_by_name("job-e2e")
    parents = client.search_runs([experiment.experiment_id], "tags.`dearli.run_name` = 'ssl_000'")
    assert len(parents) == 1  # continued, not duplicated
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[tracking.RUN_DIR_TAG] == str(workdir / "runs" / "ssl_000")
    assert parent.data.params["train.max_steps"] == "2" and parent.data.params["data.partition"] == "1_4"
    assert parent.data.metrics["eval/PQ"] == pytest.approx(final_metric(first.stdout, "teacher"), abs=0.006)
    assert parent.data.metrics["eval_student/PQ"] == pytest.approx(final_metric(first.stdout, "student"), abs=0.006)
    assert {"eval_noens/PQ", "eval/mIoU", "eval_student_noens/mIoU"} <= set(parent.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "per_class.csv"} <= artifacts

    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {r.info.run_name: r.info.status for r in children} == dict.fromkeys(STAGES, "FINISHED")
    by_stage = {r.info.run_name: r for r in children}
    # the step metrics, under the names documented in dearli/stages/tracking.py
    assert STEP_METRICS <= set(by_stage["warmup"].data.metrics)
    assert STEP_METRICS | SSL_STEP_METRICS <= set(by_stage["ssl"].data.metrics)
    assert "eval/PQ" in by_stage["ssl"].data.metrics  # the evaluation at the last step
    # ... with the values of the stage's metrics.jsonl, step by step
    records = [json.loads(line) for line in (workdir / "runs" / "ssl_000" / "ssl" / "metrics.jsonl").read_text()
               .splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for name in ("staleness", "wait_fraction", "pl/labeled_fraction", "pl/mean_confidence", "images_per_s"):
        history = client.get_metric_history(by_stage["ssl"].info.run_id, name)
        assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r[name])) for r in steps], name
    assert by_stage["warmup"].data.metrics["cost/warmup/worker_peak_mb"] == pytest.approx(
        costs["warmup"]["worker_peak_mb"])
    assert parent.data.metrics["cost/ssl/teacher_peak_mb"] == pytest.approx(costs["ssl"]["teacher_peak_mb"])

    versions = client.search_model_versions("name = 'dearli-job'")
    assert [(v.version, v.run_id) for v in versions] == [("1", parent.info.run_id)]
    payload = load_checkpoint(registry.resolve_checkpoint("models:/dearli-job/1", mlflow_url))
    assert payload["config"].data.dataset == str(workdir / "datasets" / "synth_16_4")
    assert payload["step"] == 2 and "optimizer" not in payload


def test_supervised_job_writes_absolute_paths_under_its_workdir(tmp_path):
    # also as users run it: jobs/ssl.py sits beside it, so jobs/ must leave sys.path here too
    workdir = tmp_path / "work"
    write_synth_dataset(workdir / "datasets" / "synth_4_1", num_images=4, seed=0, num_val=1)  # as a run left it
    (workdir / "runs" / "supervised_000").mkdir(parents=True)  # an earlier run, never reused
    args = ["--workdir", str(workdir), "--preset", "tiny", "--num-images", "4", "--val-images", "1",
            "--partition", "1_4", "--steps", "1",
            "train.batch_size=1", "model.loss.num_points=256", "data.crop_size=64",
            "model.inference.test_short_side=64"]
    done = subprocess.run([sys.executable, "jobs/supervised.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = workdir / "runs" / "supervised_001"
    assert f"dataset: reusing the synthetic world {workdir / 'datasets' / 'synth_4_1'}" in done.stdout
    assert f"checkpoint: {run_dir / 'checkpoints' / 'step_0000001.pt'}" in done.stdout
    assert f"run directory: {run_dir} (" in done.stdout
    assert (run_dir / "eval" / "step_0000001" / "metrics.json").is_file()


def test_supervised_job_trains_the_presets_steps_unless_told(tmp_path, monkeypatch):
    import importlib.util

    from dearli.training import supervised

    spec = importlib.util.spec_from_file_location("supervised_job", REPO / "jobs" / "supervised.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    workdir = tmp_path / "work"
    write_synth_dataset(workdir / "datasets" / "synth_4_1", num_images=4, seed=0, num_val=1, image_size=(64, 64))
    preset = tmp_path / "preset.yaml"
    preset.write_text("extends: tiny\ntrain:\n  max_steps: 7\n")
    trained = []
    monkeypatch.setattr(supervised, "train_supervised", lambda cfg, run_dir: trained.append(cfg) or {"checkpoint": ""})
    args = ["--workdir", str(workdir), "--preset", str(preset), "--num-images", "4", "--val-images", "1",
            "--partition", "1_4"]
    assert job.main(args) == 0 and job.main([*args, "--steps", "3"]) == 0
    assert [cfg.train.max_steps for cfg in trained] == [7, 3]


def test_cache_locations_follow_what_the_caches_hold(synth, tmp_path):
    """The default cache folders are a hash of the cache settings: how a cache is computed (actors, images per
    part) shares it, what it holds (SAM settings, the CLIP's test scale) does not."""
    opts = PipelineOptions(dataset=str(synth), preset="tiny", sam_generator="sam",
                           overrides=("cache.sam_type=tiny",))

    def caches(*overrides: str) -> tuple[str, str]:
        cfg, _ = build_config(dataclasses.replace(opts, overrides=(*opts.overrides, *overrides)), synth, tmp_path,
                              "run")
        return cfg.cache.sam_cache, cfg.cache.clip_cache

    base = caches()
    assert caches("cache.images_per_part=3") == base
    assert caches("cache.points_per_side=8")[0] != base[0] and caches("cache.points_per_side=8")[1] == base[1]
    assert caches("model.inference.test_short_side=96")[1] != base[1]


def test_the_project_clip_is_a_pipeline_step_of_its_own(tmp_path):
    """The synth preset's CLIP is resolved to its cache path without training; the pipeline's first step
    records it in stages.json and as a nested MLflow run (here reused: the file is already cached)."""
    from mlflow.tracking import MlflowClient

    from dearli.pretrain.resolve import CACHE_FOLDER
    from dearli.stages import pipeline_steps
    from dearli.stages.pipeline import read_state, write_state

    opts = PipelineOptions(preset="synth", sam_generator="felzenszwalb")
    workdir, run_dir = tmp_path / "work", tmp_path / "work" / "runs" / "run"
    cfg, _ = build_config(opts, tmp_path / "data", workdir, "run")
    clip = Path(cfg.model.backbone.pretrained)
    assert clip.parent == workdir / CACHE_FOLDER and not clip.exists()  # resolved, not trained
    clip.parent.mkdir(parents=True)
    clip.write_bytes(b"cached")  # as an earlier run left it
    run_dir.mkdir(parents=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = tracking.PipelineTracker.open(uri, "clip-step", "run", run_dir)
    said: list[str] = []
    ctx = pipeline_steps.StageContext(cfg=cfg, run_dir=run_dir, tracker=tracker, state={},
                                      save_state=lambda state: write_state(run_dir, state), echo=said.append)
    pipeline_steps.pretrain_clip(ctx, workdir / CACHE_FOLDER)
    assert read_state(run_dir)["clip"] == {"checkpoint": str(clip), "reused": True}
    assert said == [f"clip: reusing the project's CLIP {clip}"]
    children = MlflowClient(uri).search_runs([tracker.experiment_id],
                                            f"tags.mlflow.parentRunId = '{tracker.run_id}'")
    assert [(r.info.run_name, r.data.tags[tracking.REUSED_TAG]) for r in children] == [("clip", "true")]
    other, _ = build_config(PipelineOptions(preset="tiny", sam_generator="felzenszwalb"), tmp_path / "data",
                            workdir, "run")
    ctx.cfg, ctx.state = other, {}
    pipeline_steps.pretrain_clip(ctx, workdir / CACHE_FOLDER)  # another CLIP: no step at all
    assert ctx.state == {}
