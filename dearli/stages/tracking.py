"""Run tracking: every logged number goes to the run's ``metrics.jsonl`` and, when configured, to MLflow.

This is the only module that imports mlflow. Layout of a pipeline run in MLflow:

* one parent run per pipeline run (experiment ``--experiment``), found again by its ``dearli.run_dir``
  tag when the same run continues;
* one nested run per stage (``cache``, ``warmup``, ``ssl``, ``evaluate``), found by ``dearli.stage``;
* params: the resolved config, flattened (``optim.lr``); evaluation metrics ``eval/PQ`` ...;
* the final teacher as an MLflow 3 logged model (a state-dict checkpoint file, no pickled code)
  registered as a model version, which ``resolve_checkpoint("models:/dearli/1")`` downloads back.

Ray Train V2 has no MLflow callback: the training function logs from rank 0 itself. It receives a
picklable :class:`TrackingSpec` (tracking URI + run id of the stage's MLflow run) and opens a
:class:`StepLogger` on it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dearli.errors import ConfigError, DataError

DEFAULT_EXPERIMENT = "dearli"
DEFAULT_MODEL_NAME = "dearli"
RUN_DIR_TAG = "dearli.run_dir"  # identifies a pipeline's parent run: same directory = same run
RUN_NAME_TAG = "dearli.run_name"
STAGE_TAG = "dearli.stage"
REUSED_TAG = "dearli.reused"  # a stage whose output existed before this run
MODEL_FILE = "checkpoint.pt"  # the dearli checkpoint inside a logged model's artifacts
LOCAL_STORE = "mlflow.db"  # the sqlite store inside the workdir when MLFLOW_TRACKING_URI is unset
LOCAL_ARTIFACTS = "mlartifacts"  # artifact root beside a local sqlite store
# Eval metric prefixes of the four evaluated variants (ensembled teacher first).
EVAL_PREFIXES = {"teacher": "eval", "student": "eval_student", "teacher_noens": "eval_noens",
                 "student_noens": "eval_student_noens"}

# MLflow metric names allow alphanumerics, _ - . / and space; anything else becomes "_".
_METRIC_NAME = re.compile(r"[^\w\-./ ]")
_MAX_BATCH = 100  # params per log_batch call (MLflow's limit)


@dataclass(frozen=True)
class TrackingSpec:
    """Where a stage's numbers go in MLflow (picklable: it travels to Ray workers)."""

    tracking_uri: str
    run_id: str


class StepLogger:
    """Append ``{"step": N, ...}`` records to ``metrics.jsonl``; mirror numeric values to MLflow."""

    def __init__(self, jsonl_path: str | Path, spec: TrackingSpec | None = None):
        self.path = Path(jsonl_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.spec = spec
        self._client = None
        if spec is not None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=spec.tracking_uri)

    def log(self, step: int, values: dict[str, Any], prefix: str = "") -> None:
        """Record ``values`` (numbers, or nested dicts of numbers) at ``step``."""
        record = {"step": int(step), **values}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, default=float) + "\n")
        if self._client is None:
            return
        from mlflow.entities import Metric

        flat = flatten_numbers(values, prefix)
        metrics = [Metric(key=k, value=v, timestamp=_now_ms(), step=int(step)) for k, v in flat.items()]
        if metrics:
            self._client.log_batch(self.spec.run_id, metrics=metrics)


def flatten_numbers(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested dict -> {"a/b": float} with finite numbers only, names made MLflow-safe."""
    out: dict[str, float] = {}
    for key, value in values.items():
        name = _METRIC_NAME.sub("_", f"{prefix}{key}")
        if isinstance(value, dict):
            out.update(flatten_numbers(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def flatten_params(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dict -> {"optim.lr": "0.001"}: every leaf as a string (lists as JSON)."""
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, f"{name}."))
        elif isinstance(value, (list, tuple, dict)):
            out[name] = json.dumps(value)
        else:
            out[name] = str(value)
    return out


def eval_metrics(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """{"teacher": {"PQ": ..}, "student": ..} -> {"eval/PQ": .., "eval_student/PQ": ..}."""
    out = {}
    for variant, summary in metrics.items():
        prefix = EVAL_PREFIXES.get(variant, f"eval_{variant}")
        out.update(flatten_numbers(summary, f"{prefix}/"))
    return out


def _now_ms() -> int:
    return int(time.time() * 1000)


# --- where the numbers go -------------------------------------------------------------------------------

def resolve_tracking_uri(workdir: str | Path) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else a sqlite store in ``workdir`` (never a ./mlruns file store)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return uri or local_store_uri(workdir)


def local_store_uri(workdir: str | Path) -> str:
    return f"sqlite:///{Path(workdir).expanduser().resolve() / LOCAL_STORE}"


def local_store_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None (a server or another database)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):])


def where_to_look(uri: str, experiment_id: str, run_id: str) -> str:
    """How a person opens the run: the ``mlflow ui`` command for a local store, else the run's web page."""
    if local_store_path(uri) is not None:
        return f"mlflow ui --backend-store-uri {uri}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"tracking URI {uri}"


def check_store(uri: str) -> None:
    """Fail early, in one line, when the MLflow store cannot be reached."""
    from mlflow.exceptions import MlflowException

    try:
        _client(uri).search_experiments(max_results=1)
    except (MlflowException, OSError) as err:
        raise ConfigError(f"MLFLOW_TRACKING_URI: cannot reach the MLflow store {uri} ({err})") from None


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(client: Any, uri: str, name: str) -> str:
    """The id of experiment ``name``, created if missing (artifacts beside a local sqlite store)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise ConfigError(f"--experiment: MLflow experiment {name!r} is deleted; restore it or pick another name")
        return found.experiment_id
    store = local_store_path(uri)
    location = (store.parent / LOCAL_ARTIFACTS).as_uri() if store is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by another pipeline
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


class PipelineTracker:
    """The MLflow side of one pipeline run: a parent run, nested stage runs, metrics, artifacts, model."""

    def __init__(self, client: Any, uri: str, experiment_id: str, run_id: str, continued: bool):
        self.client, self.uri = client, uri
        self.experiment_id, self.run_id, self.continued = experiment_id, run_id, continued
        self._stages: dict[str, str] = {}

    @classmethod
    def open(cls, uri: str, experiment: str, run_name: str, run_dir: str | Path) -> PipelineTracker:
        """Continue the parent run of ``run_dir`` if the store has one, else start it."""
        from mlflow.tracking.context.registry import resolve_tags

        client = _client(uri)
        experiment_id = ensure_experiment(client, uri, experiment)
        run_dir = str(run_dir)
        found = client.search_runs([experiment_id], f"tags.`{RUN_DIR_TAG}` = '{_quote(run_dir)}'",
                                   max_results=1, order_by=["attributes.start_time DESC"])
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            return cls(client, uri, experiment_id, run_id, continued=True)
        tags = resolve_tags({RUN_DIR_TAG: run_dir, RUN_NAME_TAG: run_name})
        run = client.create_run(experiment_id, run_name=run_name, tags=tags)
        return cls(client, uri, experiment_id, run.info.run_id, continued=False)

    def where(self) -> str:
        return where_to_look(self.uri, self.experiment_id, self.run_id)

    def log_params(self, params: dict[str, str]) -> None:
        """Log params the run does not have yet (MLflow params are write-once)."""
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in have]
        for start in range(0, len(new), _MAX_BATCH):
            self.client.log_batch(self.run_id, params=new[start:start + _MAX_BATCH])

    def stage_run(self, stage: str) -> str:
        """The nested run of ``stage`` (found again when the pipeline continues, else created)."""
        if stage in self._stages:
            return self._stages[stage]
        found = self.client.search_runs(
            [self.experiment_id],
            f"tags.mlflow.parentRunId = '{self.run_id}' and tags.`{STAGE_TAG}` = '{_quote(stage)}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
        else:
            tags = {"mlflow.parentRunId": self.run_id, STAGE_TAG: stage}
            run_id = self.client.create_run(self.experiment_id, run_name=stage, tags=tags).info.run_id
        self._stages[stage] = run_id
        return run_id

    @contextmanager
    def stage(self, stage: str) -> Iterator[TrackingSpec]:
        """Run ``stage`` under its nested run: RUNNING inside, then FINISHED, FAILED or KILLED."""
        run_id = self.stage_run(stage)
        self.client.update_run(run_id, status="RUNNING")
        try:
            yield TrackingSpec(self.uri, run_id)
        except KeyboardInterrupt:
            self.client.set_terminated(run_id, status="KILLED")
            raise
        except BaseException:
            self.client.set_terminated(run_id, status="FAILED")
            raise
        self.client.set_terminated(run_id, status="FINISHED")

    def reused(self, stage: str, tags: dict[str, str]) -> None:
        """Record a stage whose output existed before: its nested run says what was reused."""
        run_id = self.stage_run(stage)
        run = self.client.get_run(run_id)
        if run.info.status == "FINISHED":
            return
        for key, value in {REUSED_TAG: "true", **tags}.items():
            self.client.set_tag(run_id, key, value)
        self.client.set_terminated(run_id, status="FINISHED")

    def log_metrics(self, values: dict[str, float], step: int, run_ids: tuple[str, ...] = ()) -> None:
        """Log ``values`` at ``step`` on the parent run and on ``run_ids``."""
        from mlflow.entities import Metric

        metrics = [Metric(k, float(v), _now_ms(), int(step)) for k, v in values.items()]
        for run_id in (self.run_id, *run_ids):
            self.client.log_batch(run_id, metrics=metrics)

    def set_tags(self, tags: dict[str, str], run_id: str | None = None) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id or self.run_id, key, value)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, run_id: str | None = None) -> None:
        """Upload a file, or a directory's contents, under ``artifact_path``."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id or self.run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(run_id or self.run_id, str(path), artifact_path)

    def register_model(self, model_dir: str | Path, name: str, source_run_id: str,
                       tags: dict[str, str] | None = None) -> dict[str, str]:
        """Log ``model_dir`` as an MLflow logged model and register it as a version of ``name``.

        Idempotent per run: a continued pipeline finds the version it registered before.
        Returns {"name", "version", "uri" (models:/name/version), "model_id"}.
        """
        from mlflow.entities import LoggedModelStatus
        from mlflow.exceptions import MlflowException

        done = self.client.search_model_versions(f"name = '{_quote(name)}' and run_id = '{source_run_id}'")
        if done:
            version = max(done, key=lambda v: int(v.version))
            return _version_info(version)
        model = self.client.create_logged_model(self.experiment_id, name=name, source_run_id=source_run_id,
                                                tags=tags, model_type="dearli")
        self.client.log_model_artifacts(model.model_id, str(model_dir))
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        if not self.uri.startswith(("http://", "https://")):
            # An in-process registry store resolves the models:/ source below through MLflow's process-wide
            # tracking URI, not the client's (a server resolves it itself).
            import mlflow

            mlflow.set_tracking_uri(self.uri)
        try:
            self.client.create_registered_model(name)
        except MlflowException as err:
            if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        version = self.client.create_model_version(name, source=f"models:/{model.model_id}", run_id=source_run_id,
                                                   model_id=model.model_id, tags=tags)
        return _version_info(version)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def _version_info(version: Any) -> dict[str, str]:
    return {"name": version.name, "version": str(version.version), "uri": f"models:/{version.name}/{version.version}",
            "model_id": str(getattr(version, "model_id", "") or "")}


# --- reading a registered model back --------------------------------------------------------------------

_MLFLOW_REF = re.compile(r"^(models|runs|mlflow-artifacts):/")


def is_mlflow_uri(ref: str) -> bool:
    return bool(_MLFLOW_REF.match(str(ref)))


def model_cache_dir() -> Path:
    """Where downloaded model versions are kept (they never change, so one download is enough)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root).expanduser() / "dearli" / "models"


def _parse_model_ref(ref: str) -> tuple[str, str, str]:
    """``models:/name/version`` | ``models:/name/latest`` | ``models:/name@alias`` -> (name, version, alias)."""
    body = ref[len("models:/"):]
    if "@" in body:
        name, alias = body.split("@", 1)
        return name, "", alias
    name, _, version = body.partition("/")
    if not name or not version or "/" in version:
        raise DataError(ref, "expected models:/NAME/VERSION, models:/NAME/latest or models:/NAME@ALIAS")
    return name, version, ""


def _artifact_uri(client: Any, ref: str) -> tuple[str, str]:
    """(download URI, pinned reference): a model version becomes its storage location, ``latest`` and
    aliases become a version number; other URIs are returned as they are."""
    if not ref.startswith("models:/"):
        return ref, ref
    name, version, alias = _parse_model_ref(ref)
    if alias:
        version = client.get_model_version_by_alias(name, alias).version
    elif version.lower() == "latest":
        versions = client.search_model_versions(f"name = '{_quote(name)}'")
        if not versions:
            raise DataError(ref, "no version of this registered model exists")
        version = str(max(int(v.version) for v in versions))
    return client.get_model_version_download_uri(name, version), f"models:/{name}/{version}"


def resolve_checkpoint(ref: str, tracking_uri: str | None = None) -> str:
    """A local checkpoint file for ``ref``: a path is returned as it is; ``models:/NAME/VERSION`` (or
    ``/latest``, ``@alias``) and ``runs:/RUN_ID/PATH`` are downloaded from the MLflow store at
    ``tracking_uri`` (default: ``MLFLOW_TRACKING_URI``, else the default workdir's local store)."""
    if not is_mlflow_uri(ref):
        return ref
    if ref.startswith("models:/"):
        _parse_model_ref(ref)  # a malformed reference fails before any connection
    from mlflow.exceptions import MlflowException

    from dearli.stages.workspace import DEFAULT_WORKDIR

    uri = tracking_uri or resolve_tracking_uri(DEFAULT_WORKDIR)
    try:
        source, pinned = _artifact_uri(_client(uri), ref)
        return str(_checkpoint_file(_download(source, pinned, uri), ref))
    except MlflowException as err:
        raise DataError(ref, f"cannot fetch it from the MLflow store {uri}: {err.message.splitlines()[0]}") from None


def _download(source: str, pinned: str, uri: str) -> Path:
    """Download ``source`` once into the model cache, keyed by store and ``pinned`` name (atomically: a
    half-done download is never used)."""
    import mlflow

    key = hashlib.sha1(f"{uri}\n{pinned}".encode()).hexdigest()[:16]
    target = model_cache_dir() / key
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=target.parent))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp), tracking_uri=uri)
        os.replace(tmp, target)
    except OSError:  # another process finished the same download first
        shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _checkpoint_file(folder: Path, ref: str) -> Path:
    """The checkpoint inside a downloaded model or artifact: ``checkpoint.pt``, else the only ``.pt``."""
    if (folder / MODEL_FILE).is_file():
        return folder / MODEL_FILE
    found = sorted(folder.rglob("*.pt"))
    if len(found) != 1:
        raise DataError(ref, f"expected one checkpoint (.pt) in the downloaded artifacts, found {len(found)}")
    return found[0]
