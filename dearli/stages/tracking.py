"""Run tracking: every logged number goes to the run's ``metrics.jsonl`` and, when configured, to MLflow.

With :mod:`dearli.stages.registry` (the registered teacher), the only place that talks to MLflow. Layout of a
pipeline run in MLflow:

* one parent run per pipeline run (experiment ``--experiment``), found again by its ``dearli.run_dir``
  tag when the same run continues;
* one nested run per stage (``cache``, ``warmup``, ``ssl``, ``evaluate``), found by ``dearli.stage``;
* params: the resolved config, flattened (``optim.lr``); evaluation metrics ``eval/PQ`` ... (see
  ``EVAL_PREFIXES``) on the parent and the ``evaluate`` run;
* the final teacher as an MLflow 3 logged model, registered as a model version (see the registry module);
  a diagnostic run's (``ssl.oracle_labels``) carries the tag ``dearli.diagnostic`` (``DIAGNOSTIC_TAG``), as
  its runs do, and ``dearli serve`` refuses it.

Step metrics. A stage's MLflow run holds, per logged step, the numeric values of the ``metrics.jsonl``
record of that step under the same names (nested dicts joined with ``/``; non-numbers such as
``teacher_nodes``, the Ray nodes whose teachers labelled the batches, stay in the file only). Rank 0 logs
them every ``train.log_every`` steps and at the last one; values are means over the steps since the last
record.

* both stages: ``loss`` (the optimised total), ``loss_ce``, ``loss_mask``, ``loss_dice`` (final decoder
  layer's terms), ``grad_norm``, ``lr``, ``images_per_s`` (all ranks, since the stage's (re)start),
  ``eta_s``, ``seconds``;
* ``ssl`` only: ``loss_sup`` and ``loss_unsup`` (labeled and pseudo-labelled parts of ``loss``; the
  terms above with suffix ``_unsup`` for the pseudo-labelled part), ``staleness`` (student step minus the
  teacher weights version that made the pseudo-labels) and ``staleness_max``, ``wait_fraction`` (share of
  the step time the student waited for pseudo-labels), ``relabelled`` (batches labelled again because too
  stale), ``teacher_version``, and the pseudo-label statistics ``pl/segments_per_image``,
  ``pl/labeled_fraction`` (pixels owned by a kept segment) and ``pl/mean_confidence`` (teacher score of
  the kept segments), none of these during the burn-in (``ssl.burn_in_steps``, no label asked for); with
  ``ssl.truth_stats``, the labels against the unlabeled images' annotations: ``gt/segments_per_image``,
  ``gt/things_per_image``, ``pl/thing_recall``, ``pl/thing_precision``; evaluations during training as
  ``eval/PQ`` ... at their step.

Ray Train V2 has no MLflow callback: the training function logs from rank 0 itself. It receives a
picklable :class:`TrackingSpec` (tracking URI + run id of the stage's MLflow run) and opens a
:class:`StepLogger` on it.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dearli.errors import ConfigError

DEFAULT_EXPERIMENT = "dearli"
DEFAULT_MODEL_NAME = "dearli"
RUN_DIR_TAG = "dearli.run_dir"  # identifies a pipeline's parent run: same directory = same run
RUN_NAME_TAG = "dearli.run_name"
STAGE_TAG = "dearli.stage"
REUSED_TAG = "dearli.reused"  # a stage whose output existed before this run
# Runs and model versions whose figures are no result (ssl.oracle_labels); dearli serve refuses such a model.
DIAGNOSTIC_TAG = "dearli.diagnostic"
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
        mlflow_client(uri).search_experiments(max_results=1)
    except (MlflowException, OSError) as err:
        raise ConfigError(f"MLFLOW_TRACKING_URI: cannot reach the MLflow store {uri} ({err})") from None


def mlflow_client(uri: str):
    """A client of the tracking and model-registry store at ``uri``."""
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


def quote(value: str) -> str:
    """``value`` escaped for a quoted string literal of an MLflow search filter."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


class PipelineTracker:
    """The MLflow side of one pipeline run: a parent run, nested stage runs, metrics, artifacts (the model:
    :func:`dearli.stages.registry.register_model`)."""

    def __init__(self, client: Any, uri: str, experiment_id: str, run_id: str, continued: bool):
        self.client, self.uri = client, uri
        self.experiment_id, self.run_id, self.continued = experiment_id, run_id, continued
        self._stages: dict[str, str] = {}

    @classmethod
    def open(cls, uri: str, experiment: str, run_name: str, run_dir: str | Path) -> PipelineTracker:
        """Continue the parent run of ``run_dir`` if the store has one, else start it."""
        from mlflow.tracking.context.registry import resolve_tags

        client = mlflow_client(uri)
        experiment_id = ensure_experiment(client, uri, experiment)
        run_dir = str(run_dir)
        found = client.search_runs([experiment_id], f"tags.`{RUN_DIR_TAG}` = '{quote(run_dir)}'",
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
            f"tags.mlflow.parentRunId = '{self.run_id}' and tags.`{STAGE_TAG}` = '{quote(stage)}'", max_results=1)
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

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
