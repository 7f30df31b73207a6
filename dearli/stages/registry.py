"""The final teacher in the MLflow model registry, and any checkpoint reference read back as a local file.

``register_model`` logs a folder (a state-dict checkpoint file ``checkpoint.pt`` and its ``config.yaml``,
no pickled code) as an MLflow 3 logged model and registers it as a version of a registered model.
``resolve_checkpoint`` turns ``models:/NAME/VERSION`` (``/latest``, ``@alias``), ``runs:/RUN_ID/PATH`` or
``mlflow-artifacts:/...`` into a downloaded checkpoint file (a plain path stays as it is), which is what
``dearli predict --checkpoint`` and ``dearli pseudo-label --checkpoint`` accept; ``resolve_model`` also
returns the model version's tags (``dearli serve`` refuses a ``dearli.diagnostic`` one).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dearli.errors import DataError
from dearli.stages.tracking import PipelineTracker, mlflow_client, quote, resolve_tracking_uri

MODEL_FILE = "checkpoint.pt"  # the dearli checkpoint inside a logged model's artifacts
_MLFLOW_REF = re.compile(r"^(models|runs|mlflow-artifacts):/")


def register_model(tracker: PipelineTracker, model_dir: str | Path, name: str, source_run_id: str,
                   tags: dict[str, str] | None = None, description: str | None = None) -> dict[str, str]:
    """Log ``model_dir`` as an MLflow logged model of ``tracker``'s experiment and register it as a version
    of ``name`` (with ``tags`` and ``description``).

    Idempotent per run: a continued pipeline finds the version it registered before.
    Returns {"name", "version", "uri" (models:/name/version), "model_id"}.
    """
    from mlflow.entities import LoggedModelStatus
    from mlflow.exceptions import MlflowException

    client = tracker.client
    done = client.search_model_versions(f"name = '{quote(name)}' and run_id = '{source_run_id}'")
    if done:
        return _version_info(max(done, key=lambda v: int(v.version)))
    model = client.create_logged_model(tracker.experiment_id, name=name, source_run_id=source_run_id, tags=tags,
                                       model_type="dearli")
    client.log_model_artifacts(model.model_id, str(model_dir))
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    if not tracker.uri.startswith(("http://", "https://")):
        # An in-process registry store resolves the models:/ source below through MLflow's process-wide
        # tracking URI, not the client's (a server resolves it itself).
        import mlflow

        mlflow.set_tracking_uri(tracker.uri)
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    version = client.create_model_version(name, source=f"models:/{model.model_id}", run_id=source_run_id,
                                          model_id=model.model_id, tags=tags, description=description)
    return _version_info(version)


def _version_info(version: Any) -> dict[str, str]:
    return {"name": version.name, "version": str(version.version), "uri": f"models:/{version.name}/{version.version}",
            "model_id": str(getattr(version, "model_id", "") or "")}


# --- reading a registered model back --------------------------------------------------------------------

def is_mlflow_uri(ref: str) -> bool:
    """True for ``models:/``, ``runs:/`` and ``mlflow-artifacts:/`` references (not for file paths)."""
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


def _artifact_uri(client: Any, ref: str) -> tuple[str, str, dict[str, str]]:
    """(download URI, pinned reference, the version's tags): a model version becomes its storage location,
    ``latest`` and aliases become a version number; other URIs are returned as they are, without tags."""
    if not ref.startswith("models:/"):
        return ref, ref, {}
    name, version, alias = _parse_model_ref(ref)
    if alias:
        found = client.get_model_version_by_alias(name, alias)
    elif version.lower() == "latest":
        versions = client.search_model_versions(f"name = '{quote(name)}'")
        if not versions:
            raise DataError(ref, "no version of this registered model exists")
        found = max(versions, key=lambda v: int(v.version))
    else:
        found = client.get_model_version(name, version)
    return (client.get_model_version_download_uri(name, found.version), f"models:/{name}/{found.version}",
            dict(found.tags or {}))


def resolve_checkpoint(ref: str, tracking_uri: str | None = None) -> str:
    """A local checkpoint file for ``ref``: a path is returned as it is; ``models:/NAME/VERSION`` (or
    ``/latest``, ``@alias``) and ``runs:/RUN_ID/PATH`` are downloaded from the MLflow store at
    ``tracking_uri`` (default: ``MLFLOW_TRACKING_URI``, else the default workdir's local store)."""
    return resolve_model(ref, tracking_uri)[0]


def pinned_reference(ref: str, tracking_uri: str | None = None) -> str:
    """``models:/NAME/N`` that ``models:/NAME/latest`` or ``models:/NAME@alias`` names now (a fixed version
    or another reference is returned as it is); nothing is downloaded. DataError naming the store."""
    if not ref.startswith("models:/"):
        return ref
    _parse_model_ref(ref)
    from mlflow.exceptions import MlflowException

    from dearli.config import DEFAULT_WORKDIR

    uri = tracking_uri or resolve_tracking_uri(DEFAULT_WORKDIR)
    try:
        return _artifact_uri(mlflow_client(uri), ref)[1]
    except MlflowException as err:
        raise DataError(ref, f"cannot look it up in the MLflow store {uri}: {err.message.splitlines()[0]}") from None


def resolve_model(ref: str, tracking_uri: str | None = None) -> tuple[str, dict[str, str]]:
    """(local checkpoint file, tags of the model version) for ``ref`` as :func:`resolve_checkpoint` reads
    it; the tags are {} for a path and for references other than ``models:/``."""
    if not is_mlflow_uri(ref):
        return ref, {}
    if ref.startswith("models:/"):
        _parse_model_ref(ref)  # a malformed reference fails before any connection
    from mlflow.exceptions import MlflowException

    from dearli.config import DEFAULT_WORKDIR

    uri = tracking_uri or resolve_tracking_uri(DEFAULT_WORKDIR)
    try:
        source, pinned, tags = _artifact_uri(mlflow_client(uri), ref)
        return str(_checkpoint_file(_download(source, pinned, uri), ref)), tags
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
