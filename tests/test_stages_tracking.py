"""MLflow tracking of a pipeline run, against a real ``mlflow server`` on 127.0.0.1 read back with MlflowClient:
parent and nested stage runs, params, metric names, artifacts, the registered teacher and ``dearli predict
--checkpoint models:/dearli/1``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from dearli.cli import main
from dearli.config import load_config
from dearli.config_io import flatten_params, to_dict
from dearli.errors import DataError
from dearli.stages import registry, tracking
from dearli.stages.report import export_teacher
from dearli.stages.tracking import PipelineTracker, StepLogger

FAST = ["model.inference.test_short_side=64", "model.loss.num_points=256", "data.crop_size=64"]
# conftest's checkpoint fixture (of small_world): with optimiser state, as a stage writes it
CHECKPOINT = {"overrides": FAST, "record_dataset": True, "step": 7, "optimizer": True}
EVAL = {"teacher": {"PQ": 12.5, "SQ": 60.0, "RQ": 20.0, "PQ_th": 5.0, "PQ_st": 25.0, "mIoU": 30.0},
        "student": {"PQ": 10.0, "SQ": 55.0, "RQ": 18.0, "PQ_th": 4.0, "PQ_st": 20.0, "mIoU": 28.0},
        "teacher_noens": {"PQ": 11.0, "mIoU": 29.0}, "student_noens": {"PQ": 9.0, "mIoU": 27.0}}


@pytest.fixture(scope="module")
def server(mlflow_url):
    return mlflow_url


@pytest.fixture(autouse=True)
def own_environment(monkeypatch, tmp_path):
    """MLflow writes its tracking URI into the environment; downloaded models go to a cache of the test's."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def pipeline_run(server, synth, checkpoint, tmp_path_factory):
    """A pipeline run as jobs/ssl.py logs it: params, stages (one failing), eval metrics, artifacts, model."""
    root = tmp_path_factory.mktemp("pipeline")
    run_dir = root / "runs" / "ssl_000"
    run_dir.mkdir(parents=True)
    cfg = load_config("tiny", [f"data.dataset={synth}", *FAST])
    (run_dir / "config.yaml").write_text("data: {}\n")
    tracker = PipelineTracker.open(server, "pipeline-test", "ssl_000", run_dir)
    tracker.log_params(flatten_params(to_dict(cfg)))
    with tracker.stage("warmup") as spec:
        StepLogger(run_dir / "warmup" / "metrics.jsonl", spec).log(
            3, {"loss": 2.5, "lr": 1e-3, "pl": {"segments_per_image": 4.0}, "note": "not a number"})
    with pytest.raises(RuntimeError), tracker.stage("ssl"):
        raise RuntimeError("a stage that fails")
    evaluate = tracker.stage_run("evaluate")
    tracker.log_metrics(tracking.eval_metrics(EVAL), 7, (evaluate,))
    tracker.log_artifact(run_dir / "config.yaml")
    model_dir = export_teacher(checkpoint, root / "model")
    model = registry.register_model(tracker, model_dir, "dearli", tracker.run_id, {"PQ": "12.50"})
    tracker.finish()
    return {"tracker": tracker, "cfg": cfg, "run_dir": run_dir, "model": model, "model_dir": model_dir}


def test_parent_run_holds_config_params_and_eval_metrics(server, pipeline_run):
    client = MlflowClient(server)
    run = client.get_run(pipeline_run["tracker"].run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "ssl_000"
    assert run.data.tags[tracking.RUN_DIR_TAG] == str(pipeline_run["run_dir"])
    cfg = pipeline_run["cfg"]
    assert run.data.params == flatten_params(to_dict(cfg))
    assert run.data.params["optim.lr"] == str(cfg.optim.lr)
    assert run.data.params["model.backbone.clip_model"] == "dearli-convnext-atto"
    assert run.data.params["optim.betas"] == "[0.9, 0.999]"
    assert run.data.metrics["eval/PQ"] == 12.5 and run.data.metrics["eval/mIoU"] == 30.0
    assert run.data.metrics["eval_student/PQ_th"] == 4.0
    assert run.data.metrics["eval_noens/PQ"] == 11.0 and run.data.metrics["eval_student_noens/mIoU"] == 27.0
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/PQ")] == [7]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml"]


def test_stages_are_nested_runs_with_their_status_and_step_metrics(server, pipeline_run):
    client = MlflowClient(server)
    tracker = pipeline_run["tracker"]
    children = client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{tracker.run_id}'")
    status = {r.info.run_name: r.info.status for r in children}
    assert status == {"warmup": "FINISHED", "ssl": "FAILED", "evaluate": "RUNNING"}
    warmup = next(r for r in children if r.info.run_name == "warmup")
    assert warmup.data.tags[tracking.STAGE_TAG] == "warmup"
    assert set(warmup.data.metrics) == {"loss", "lr", "pl/segments_per_image"}
    history = client.get_metric_history(warmup.info.run_id, "pl/segments_per_image")
    assert [(m.step, m.value) for m in history] == [(3, 4.0)]
    evaluate = next(r for r in children if r.info.run_name == "evaluate")
    assert evaluate.data.metrics["eval/PQ"] == 12.5
    # the same numbers are in the stage's metrics.jsonl
    line = json.loads((pipeline_run["run_dir"] / "warmup" / "metrics.jsonl").read_text())
    assert line["step"] == 3 and line["pl"] == {"segments_per_image": 4.0}


def test_same_run_dir_continues_the_parent_run_and_a_new_one_starts_fresh(server, pipeline_run, tmp_path):
    first = pipeline_run["tracker"]
    again = PipelineTracker.open(server, "pipeline-test", "ssl_000", pipeline_run["run_dir"])
    assert again.continued and again.run_id == first.run_id
    assert again.stage_run("warmup") == first.stage_run("warmup")
    assert MlflowClient(server).get_run(first.run_id).info.status == "RUNNING"
    # registering again (a continued run that had registered before) finds the version it made
    assert registry.register_model(again, pipeline_run["model_dir"], "dearli", again.run_id) == pipeline_run["model"]
    again.finish()
    other = PipelineTracker.open(server, "pipeline-test", "ssl_001", tmp_path / "runs" / "ssl_001")
    assert not other.continued and other.run_id != first.run_id
    other.finish()


def test_registered_teacher_is_a_state_dict_file(server, pipeline_run, checkpoint):
    client = MlflowClient(server)
    model = pipeline_run["model"]
    assert (model["name"], model["version"], model["uri"]) == ("dearli", "1", "models:/dearli/1")
    version = client.get_model_version("dearli", "1")
    assert version.run_id == pipeline_run["tracker"].run_id and version.tags["PQ"] == "12.50"
    local = registry.resolve_checkpoint("models:/dearli/1", server)
    payload = torch.load(local, weights_only=True)  # loads without unpickling any code
    source = torch.load(checkpoint, weights_only=True)
    assert "optimizer" not in payload and "optimizer" in source
    assert payload["step"] == 7 and payload["config"] == source["config"]
    assert payload["model"].keys() == source["model"].keys()
    assert all(torch.equal(payload["model"][k], source["model"][k]) for k in source["model"])


def test_predict_loads_a_registered_model_version(server, pipeline_run, checkpoint, synth, tmp_path, capsys,
                                                  monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    outputs = {}
    for name, ref in (("file", str(checkpoint)), ("version", "models:/dearli/1")):
        assert main(["predict", "--checkpoint", ref, "--dataset", str(synth), "--out", str(tmp_path / name),
                     "--json"]) == 0
        outputs[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert outputs["version"] == outputs["file"]
    assert registry.resolve_checkpoint("models:/dearli/latest") == registry.resolve_checkpoint("models:/dearli/1")
    for png in sorted((tmp_path / "file" / "panoptic").iterdir()):
        assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(tmp_path / "version" / "panoptic" /
                                                                                   png.name)))
    assert main(["predict", "--checkpoint", "models:/dearli/9", "--dataset", str(synth), "--out",
                 str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "models:/dearli/9" in err and server in err


def test_a_diagnostic_runs_teacher_is_registered_as_one_and_serve_refuses_it(server, pipeline_run, tmp_path,
                                                                             capsys, monkeypatch):
    """ssl.oracle_labels: the version carries the tag dearli.diagnostic and says why; dearli serve reads the tag
    (this checkpoint's own config is an ordinary one) and refuses it in one line, before any Ray starts."""
    from types import SimpleNamespace

    from dearli.stages.mean_teacher import ORACLE_WARNING
    from dearli.stages.report import _version_tags

    oracle = SimpleNamespace(cfg=load_config("tiny", ["ssl.oracle_labels=true"]), run_dir=tmp_path / "ssl_007")
    tags, description = _version_tags(oracle, {"metrics": EVAL})
    assert _version_tags(SimpleNamespace(cfg=load_config("tiny"), run_dir=oracle.run_dir), {"metrics": EVAL}) == (
        {"dearli.run_name": "ssl_007", "PQ": "12.50"}, None)
    tracker = pipeline_run["tracker"]
    model = registry.register_model(tracker, pipeline_run["model_dir"], "dearli-oracle", tracker.run_id, tags,
                                    description)
    version = MlflowClient(server).get_model_version("dearli-oracle", model["version"])
    assert version.tags[tracking.DIAGNOSTIC_TAG] == ORACLE_WARNING and version.tags["PQ"] == "12.50"
    assert version.description.startswith(ORACLE_WARNING) and "dearli serve refuses it" in version.description
    assert registry.resolve_model("models:/dearli-oracle/latest", server)[1][tracking.DIAGNOSTIC_TAG]
    assert tracking.DIAGNOSTIC_TAG not in registry.resolve_model("models:/dearli/1", server)[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.setattr("dearli.runtime.ensure_ray", lambda *a, **k: pytest.fail("Ray started for a refused model"))
    capsys.readouterr()  # MLflow's own log of the registration
    assert main(["serve", "--checkpoint", "models:/dearli-oracle/1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "models:/dearli-oracle/1: a diagnostic model" in err
    assert "tagged dearli.diagnostic" in err and "--allow-diagnostic" in err


def test_local_store_lives_in_the_workdir(tmp_path, monkeypatch):
    workdir = tmp_path / "work"
    uri = tracking.resolve_tracking_uri(workdir)
    assert uri == f"sqlite:///{workdir.resolve() / 'mlflow.db'}"
    assert tracking.where_to_look(uri, "1", "abc") == f"mlflow ui --backend-store-uri {uri}"
    workdir.mkdir()
    client = MlflowClient(uri)
    experiment = client.get_experiment(tracking.ensure_experiment(client, uri, "local"))
    assert experiment.artifact_location == (workdir.resolve() / "mlartifacts").as_uri()  # never ./mlruns
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking.resolve_tracking_uri(workdir) == "http://mlflow.example:5000"
    assert tracking.where_to_look("http://mlflow.example:5000", "1", "abc").endswith("/#/experiments/1/runs/abc")


def test_a_checkpoint_path_is_not_an_mlflow_reference(tmp_path):
    assert registry.resolve_checkpoint(str(tmp_path / "step_0000001.pt")) == str(tmp_path / "step_0000001.pt")
    for ref in ("models:/dearli", "models://1", "models:/dearli/1/x"):
        with pytest.raises(DataError, match="models:/NAME/VERSION"):
            registry.resolve_checkpoint(ref, f"sqlite:///{tmp_path / 'x.db'}")
    assert not (tmp_path / "x.db").exists()  # refused before connecting
