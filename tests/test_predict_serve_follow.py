"""``dearli serve --checkpoint models:/NAME/latest --follow S`` as a user runs it (its own process, its own local
Ray) against a real ``mlflow server``: a version registered while it serves is served a few seconds later, a
diagnostic version is skipped with a line saying why, and the endpoint answers throughout."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from _tiny_model import tiny_checkpoint

from dearli.errors import ConfigError
from dearli.predict.model_follower import ModelFollower, is_moving
from dearli.predict.model_source import checkpoint_digest
from dearli.stages import registry
from dearli.stages.tracking import DIAGNOSTIC_TAG, PipelineTracker

DEARLI = str(Path(sys.executable).with_name("dearli"))
NAME = "dearli-follow"


def test_only_a_moving_reference_can_be_followed():
    assert is_moving("models:/dearli/latest") and is_moving("models:/dearli@prod") and is_moving("models:/d/LATEST")
    for ref in ("models:/dearli/3", "runs:/abc/model", "runs/ssl/checkpoints/step_0003000.pt"):
        assert not is_moving(ref)
        with pytest.raises(ConfigError, match="models:/NAME/latest or models:/NAME@ALIAS"):
            ModelFollower(ref, deploy=lambda payload: None)


def test_a_version_that_fails_to_deploy_or_a_registry_away_keeps_the_served_model(monkeypatch):
    versions = iter(["models:/d/1", "models:/d/2", "models:/d/2", OSError("connection refused"), "models:/d/3"])

    def lookup(ref, uri=None):
        found = next(versions)
        if isinstance(found, Exception):
            raise found
        return found

    deployed = []

    def deploy(payload):
        if payload["model_version"] == "v2":
            raise RuntimeError("--classes: the checkpoint's dataset cannot be read here\nmore")
        deployed.append(payload["model_version"])

    monkeypatch.setattr("dearli.stages.registry.pinned_reference", lookup)
    monkeypatch.setattr("dearli.predict.serve.serving_payload",
                        lambda ref, allow=False: {"model_version": "v" + ref.rsplit("/", 1)[1]})
    follower = ModelFollower("models:/d/latest", deploy)
    assert follower.first() == {"model_version": "v1"} and follower.served == "models:/d/1"
    assert follower.poll() == ("models:/d/2 could not be deployed (--classes: the checkpoint's dataset cannot be "
                               "read here); still serving models:/d/1")
    assert follower.poll() is None  # skipped: not tried again
    assert follower.poll().startswith("cannot look up models:/d/latest (OSError: connection refused)")
    assert follower.poll() == "now serving models:/d/3 (v3), was models:/d/1" and deployed == ["v3"]


def _register(url: str, folder: Path, dataset: Path, seed: int, tags: dict[str, str] | None = None) -> str:
    """A tiny checkpoint (weights of ``seed``) registered as a new version of NAME; its ``model_version``."""
    checkpoint = tiny_checkpoint(folder / "run", dataset, record_dataset=True, seed=seed)
    model_dir = folder / "model"
    model_dir.mkdir()
    shutil.copy(checkpoint, model_dir / registry.MODEL_FILE)
    tracker = PipelineTracker.open(url, "dearli-follow-test", folder.name, folder)
    registry.register_model(tracker, model_dir, NAME, tracker.run_id, tags)
    return f"dearli-{checkpoint_digest(checkpoint)[:12]}"


def _health(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url + "health", timeout=5) as response:
            return json.loads(response.read())["model_version"]
    except OSError:
        return None


def _until(what: str, probe, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.5)
    raise TimeoutError(f"{what} within {timeout_s:.0f} s")


@pytest.mark.ray  # a Ray of its own, in the served process
def test_serve_follows_new_versions_and_skips_a_diagnostic(mlflow_url, small_world, tmp_path):
    first = _register(mlflow_url, tmp_path / "v1", small_world, seed=1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_url, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen([DEARLI, "serve", "--checkpoint", f"models:/{NAME}/latest", "--follow", "1", "--port",
                              str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert _until("the endpoint up", lambda: _health(url)) == first

        second = _register(mlflow_url, tmp_path / "v2", small_world, seed=2)
        assert second != first
        _until("the second version served", lambda: _health(url) == second)
        _register(mlflow_url, tmp_path / "v3", small_world, seed=3, tags={DIAGNOSTIC_TAG: "oracle labels"})
        _until("the diagnostic version skipped",
               lambda: f"models:/{NAME}/3 is not served" in (tmp_path / "serve.log").read_text())
        time.sleep(3)  # three more looks at the registry: the skipped version is not tried again
        assert _health(url) == second
        said = (tmp_path / "serve.log").read_text()
        assert f"now serving models:/{NAME}/2 ({second}), was models:/{NAME}/1" in said
        assert said.count("is not served") == 1 and "tagged dearli.diagnostic" in said
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
        log.close()
    assert serve.returncode == 0, (tmp_path / "serve.log").read_text()[-2000:]
