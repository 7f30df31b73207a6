"""The labeling endpoint on Ray Serve: :class:`~dearli.predict.labeler.Labeler` replicas behind Serve's proxy.

``dearli serve`` starts it (see :mod:`dearli.predict.commands.serve`); Serve's own tools work too::

    serve run dearli.predict.serve:app_builder checkpoint=models:/dearli/1 replicas=2

POST ``/`` with an image file (or the JSON of :mod:`dearli.predict.labeler`) answers COCO panoptic JSON; GET
``/`` answers the served class list. ``/health``, ``/setup``, ``/predict`` and ``/webhook`` speak Label Studio's
ML backend protocol (:mod:`dearli.predict.label_studio_backend`; task images from
:mod:`dearli.predict.task_images`), and a ``START_TRAINING`` event submits ``--train-command`` as a Ray job. A
bad request gets a 4xx JSON ``{"error": reason}``; the replica stays up.

Under load: a replica holds ``max_ongoing_requests`` requests (one labeled at a time), Serve queues
``max_queued_requests`` more and answers 429 with ``Retry-After`` past that; a request still unanswered after
``request_timeout_s`` gets a 503 and its work stops, as does the work of a client that disconnects (Serve
cancels it; the model checks between its steps). With a token, every request needs
``Authorization: Bearer TOKEN``, or HTTP basic authentication with the token as its password (what Label
Studio's ML backend settings send), 401 otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import os
import sys
import threading
from typing import Any

from ray import serve
from ray.serve.config import BackpressureConfig
from starlette.requests import Request
from starlette.responses import JSONResponse

from dearli.data.panoptic import CategoryMap
from dearli.device import resolve_device
from dearli.errors import ConfigError, DataError
from dearli.predict import label_studio_backend as lsb
from dearli.predict.labeler import MAX_REQUEST_BYTES, Labeler, RequestError
from dearli.predict.serve_options import ServeOptions
from dearli.predict.serve_training import submit_training
from dearli.predict.task_images import ImageSources, parse_hosts

TOKEN_ENV = "DEARLI_SERVE_TOKEN"  # the token dearli serve reads when --token is not given
LABEL_STUDIO_TOKEN_ENV = "LABEL_STUDIO_API_KEY"  # the Label Studio token when --label-studio-token is not given
SUBMIT_TIMEOUT_S = 30.0  # a training job's submission (and the look for a running one) waits this long
RETRY_AFTER_S = 1  # what a 429 or 503 tells the client to wait

APP_NAME = "dearli"
DEFAULT_OPTIONS = ServeOptions()  # frozen: one shared default


def _error(status: int, reason: str, retry: bool = False) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if retry else None
    if status == 401:
        headers = {"WWW-Authenticate": 'Bearer realm="dearli"'}
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


async def read_body(request: Request, limit: int = MAX_REQUEST_BYTES) -> bytes:
    """The request's body, counted as it streams in: RequestError 413 once it passes ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {declared} bytes exceeds {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class _Cancelled(RequestError):
    """The request's work was abandoned (timed out, or its client left): stop, answer nothing more."""


def route(request: Request) -> str:
    """The request's path below the application's route prefix, without a trailing slash ("/" at the root)."""
    path = request.scope.get("path", "/")
    root = request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path.rstrip("/") or "/"


@serve.deployment(name="labeler")
class LabelingService:
    """One replica: the model of a checkpoint payload, labeling with ``classes`` unless a request brings its own;
    Label Studio's ML backend routes beside it."""

    def __init__(self, payload: dict[str, Any], classes: list[dict], options: ServeOptions):
        self.labeler = Labeler(payload, CategoryMap.from_dicts(classes, "served classes"),
                               str(resolve_device()), options.max_pixels)
        self.classes = classes
        self.options = options
        self.model_version = payload.get("model_version") or f"dearli-step{payload.get('step', 0)}"
        with_token = bool(options.label_studio_url and options.label_studio_token)
        self.images = ImageSources(parse_hosts(options.fetch_hosts), options.label_studio_url,
                                   self._label_studio_auth if with_token else None, options.files_root)
        self._label_studio: Any = None  # the Label Studio client, made on the first read of its files
        self._label_studio_lock = threading.Lock()
        self.text_lock = asyncio.Lock()  # one new class list encoded at a time; served-list requests never wait
        self.train_lock = asyncio.Lock()  # one look-and-submit of a training job at a time
        self.model_lock = asyncio.Lock()  # waiters queue here, where a client's disconnect cancels at once

    def _authorized(self, request: Request) -> bool:
        if not self.options.token:
            return True
        given = request.headers.get("authorization", "")
        scheme, _, credentials = given.partition(" ")
        if scheme.lower() == "basic":  # Label Studio's ML backend settings: any user name, the token as password
            try:
                credentials = base64.b64decode(credentials, validate=True).decode("latin-1").partition(":")[2]
            except (binascii.Error, ValueError):
                return False
        elif scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credentials.encode("latin-1", "replace"), self.options.token.encode())

    def _label_studio_auth(self, renew: bool) -> str:
        """The Authorization header for Label Studio's files (a Client made once; renewed after a 401)."""
        from dearli.errors import DearliError
        from dearli.predict.label_studio_api import Client

        try:
            with self._label_studio_lock:
                if self._label_studio is None:
                    self._label_studio = Client(self.options.label_studio_url, self.options.label_studio_token,
                                                timeout=15.0)
                elif renew:
                    self._label_studio.renew()
                return self._label_studio.authorization
        except DearliError as err:
            raise RequestError(400, str(err)) from None

    async def __call__(self, request: Request) -> JSONResponse:
        if not self._authorized(request):
            return _error(401, "this endpoint needs 'Authorization: Bearer <token>' (or basic auth with the token "
                               "as password)")
        path = route(request)
        if path == "/":
            if request.method == "GET":
                return JSONResponse({"classes": self.classes})
            if request.method != "POST":
                return _error(405, f"{request.method} is not served: POST an image, GET the classes")
            content_type = request.headers.get("content-type", "")
            return await self._bounded(request, lambda body, check: self._label(body, content_type, check))
        if path == "/health":
            if request.method != "GET":
                return _error(405, "/health answers GET")
            return JSONResponse({"status": "UP", "model_class": lsb.MODEL_CLASS, "model_version": self.model_version})
        handlers = {"/setup": self._setup, "/predict": self._predict, "/webhook": self._webhook}
        if path not in handlers:
            return _error(404, "no such route: POST or GET /, GET /health, POST /setup, /predict or /webhook")
        if request.method != "POST":
            return _error(405, f"{path} answers POST")
        return await self._bounded(request, handlers[path])

    async def _bounded(self, request: Request, work: Any) -> JSONResponse:
        """``work(body, check)`` on the request's body, bounded by the body limit and the request timeout."""
        cancelled = threading.Event()

        def check() -> None:  # called by the model between its steps, in the worker thread
            if cancelled.is_set():
                raise _Cancelled(503, "the request was cancelled")

        try:
            body = await read_body(request)
            answer = await asyncio.wait_for(work(body, check), self.options.request_timeout_s)
        except RequestError as err:
            return _error(err.status, err.reason)
        except asyncio.TimeoutError:
            cancelled.set()
            return _error(503, f"not labeled within {self.options.request_timeout_s:g} s: the endpoint is busy",
                          retry=True)
        except BaseException:  # the client went (Serve cancels the task), or a fault of ours: stop the work
            cancelled.set()
            raise
        return answer if isinstance(answer, JSONResponse) else JSONResponse(answer)

    async def _label(self, body: bytes, content_type: str, check: Any) -> dict[str, Any]:
        prepared = await asyncio.to_thread(self.labeler.prepare, body, content_type)
        if prepared.categories is None:
            text = self.labeler.default_text
        else:
            async with self.text_lock:
                text = await asyncio.to_thread(self.labeler.text_of, prepared)
        async with self.model_lock:
            return await asyncio.to_thread(self.labeler.run, prepared, text, check)

    def _target(self, config: Any) -> lsb.Target:
        """The labeling config's target (dearli's own without a config), refused when no label names a class."""
        target = lsb.default_target(self.labeler.default) if config is None else lsb.parse_label_config(config)
        if not lsb.label_names(target, self.labeler.default):
            raise RequestError(400, f"no label of the labeling config's {target.from_name[:40]} tag names a served "
                                    "class (GET / lists them)")
        return target

    async def _setup(self, body: bytes, check: Any) -> dict[str, Any]:
        request = lsb.load_object(body, "/setup")
        if request.get("schema") is not None:
            await asyncio.to_thread(self._target, request["schema"])
        return {"model_version": self.model_version}

    async def _predict(self, body: bytes, check: Any) -> dict[str, Any]:
        tasks, config = await asyncio.to_thread(lsb.parse_predict, body, self.options.max_tasks)
        target = await asyncio.to_thread(self._target, config)
        names = lsb.label_names(target, self.labeler.default)
        results = []
        for task in tasks:
            check()
            try:
                data = await asyncio.to_thread(self.images.read, lsb.task_image(task, target), check)
                prepared = await asyncio.to_thread(self.labeler.prepare_image, data)
                async with self.model_lock:
                    panoptic, records = await asyncio.to_thread(self.labeler.segments, prepared,
                                                                self.labeler.default_text, check)
                results.append(await asyncio.to_thread(lsb.prediction, panoptic, records, target, names,
                                                       self.model_version))
            except _Cancelled:
                raise
            except RequestError as err:
                task_id = task.get("id") if isinstance(task, dict) else None
                print(f"dearli serve /predict: task {str(task_id)[:20]}: {err.reason}", file=sys.stderr, flush=True)
                results.append(lsb.failed(err.reason, self.model_version))
        return {"results": results}

    async def _webhook(self, body: bytes, check: Any) -> JSONResponse | dict[str, Any]:
        event = lsb.load_object(body, "/webhook")
        action = event.get("action")
        if not isinstance(action, str):
            raise RequestError(400, "a webhook event needs 'action'")
        if action != lsb.TRAIN_EVENT:
            status = "ok" if action in lsb.ANNOTATION_EVENTS else "ignored"
            return {"status": status, "detail": f"dearli trains on {lsb.TRAIN_EVENT} events only"}
        if not self.options.train_command:
            raise RequestError(400, "training is not configured: start dearli serve with --train-command")
        project = lsb.webhook_project(event)
        command = self.options.train_command.format(project=project, model_version=self.model_version,
                                                     label_studio_url=self.options.label_studio_url)
        try:
            async with self.train_lock:  # two events at once: the second sees the first one's job
                job = await asyncio.wait_for(asyncio.to_thread(submit_training, self.options.jobs_address, command,
                                                               project, self.model_version), SUBMIT_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RequestError(503, f"Ray's job API did not answer within {SUBMIT_TIMEOUT_S:g} s") from None
        print(f"dearli serve: {lsb.TRAIN_EVENT} of project {project}: submitted Ray job {job}", file=sys.stderr,
              flush=True)
        return JSONResponse({"status": "submitted", "job_id": job, "project": project}, status_code=202)


def serving_payload(checkpoint: str, allow_diagnostic: bool = False) -> dict[str, Any]:
    """The model payload of a checkpoint file or registered model (``models:/dearli/N``), read on the driver,
    with its ``model_version``: ``dearli-<first 12 hex digits of the file's SHA-256>``, the version ``dearli
    export label-studio`` gives the predictions of pseudo-labels made with the same file.

    A diagnostic is no model to serve: a model version tagged ``dearli.diagnostic``, or a checkpoint of a run
    whose student trained on the ground truth of its unlabeled images (``ssl.oracle_labels``). DataError (one
    line) unless ``allow_diagnostic``; then it is served with a warning on stderr.
    """
    from dearli.predict.model_source import checkpoint_digest
    from dearli.predict.worker import model_payload
    from dearli.stages.registry import resolve_model
    from dearli.stages.tracking import DIAGNOSTIC_TAG
    from dearli.training.checkpoint import load_checkpoint

    path, tags = resolve_model(checkpoint)
    payload = model_payload(load_checkpoint(path, "cpu"))
    payload["model_version"] = f"dearli-{checkpoint_digest(path)[:12]}"
    if DIAGNOSTIC_TAG in tags:
        why = f"its model version is tagged {DIAGNOSTIC_TAG}"
    elif payload["config"].ssl.oracle_labels:
        why = "ssl.oracle_labels=true: its student trained on the ground truth of the unlabeled images"
    else:
        return payload
    if not allow_diagnostic:
        raise DataError(checkpoint, f"a diagnostic model, no result to serve ({why}); --allow-diagnostic serves "
                                    "it anyway")
    print(f"WARNING: serving {checkpoint}, a diagnostic model, no result ({why})", file=sys.stderr, flush=True)
    return payload


def build_app(checkpoint: str, classes_file: str | None = None, options: ServeOptions = DEFAULT_OPTIONS,
              allow_diagnostic: bool = False) -> Any:
    """The Serve application of a checkpoint file or registered model (``models:/dearli/N``; a diagnostic
    one only with ``allow_diagnostic``, see :func:`serving_payload`).

    The checkpoint is read here, on the driver, and handed to the replicas by value: replicas on other
    nodes need no shared file system.
    """
    options.validate()
    return payload_app(serving_payload(checkpoint, allow_diagnostic), classes_file, options)


def payload_app(payload: dict[str, Any], classes_file: str | None, options: ServeOptions) -> Any:
    """The Serve application of a :func:`serving_payload` (Ray must be up: the GPUs are the cluster's)."""
    from dearli.predict.model_source import resolve_classes
    from dearli.runtime import default_gpus_per_actor

    classes = [c.to_dict() for c in resolve_classes(classes_file, payload["config"]).categories]
    gpus = default_gpus_per_actor() if options.gpus_per_replica == -1 else options.gpus_per_replica
    scaling: dict[str, Any] = {"num_replicas": options.replicas}
    if options.max_replicas > options.replicas:
        scaling = {"autoscaling_config": {"min_replicas": options.replicas, "max_replicas": options.max_replicas,
                                          "target_ongoing_requests": options.target_ongoing_requests}}
    deployment = LabelingService.options(
        ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": gpus},
        max_ongoing_requests=options.max_ongoing_requests, max_queued_requests=options.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=RETRY_AFTER_S), **scaling)
    return deployment.bind(payload, classes, options)


def app_builder(args: dict[str, str]) -> Any:
    """``serve run dearli.predict.serve:app_builder checkpoint=... [classes=FILE] [replicas=N] ...
    [allow_diagnostic=true]``; the token is ``token=...`` or ``$DEARLI_SERVE_TOKEN``, Label Studio's
    ``label_studio_token=...`` or ``$LABEL_STUDIO_API_KEY``. The proxy's timeout is then Serve's own setting."""
    args = dict(args)
    checkpoint = args.pop("checkpoint", None)
    if not checkpoint:
        raise ConfigError("serve run: pass checkpoint=FILE or checkpoint=models:/dearli/N")
    classes = args.pop("classes", None)
    allow_diagnostic = args.pop("allow_diagnostic", "false").lower()
    if allow_diagnostic not in ("true", "false"):
        raise ConfigError(f"serve run: allow_diagnostic={allow_diagnostic!r} is not true or false")
    fields = ServeOptions.__dataclass_fields__
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise ConfigError(f"serve run: unknown argument(s) {', '.join(unknown)}; known: checkpoint, classes, "
                          f"allow_diagnostic, {', '.join(fields)}")
    values: dict[str, Any] = {"token": os.environ.get(TOKEN_ENV, ""),
                              "label_studio_token": os.environ.get(LABEL_STUDIO_TOKEN_ENV, "")}
    for name, value in args.items():
        try:
            values[name] = type(getattr(ServeOptions(), name))(value)
        except ValueError:
            raise ConfigError(f"serve run: {name}={value!r} is not a {type(getattr(ServeOptions(), name)).__name__}") \
                from None
    return build_app(checkpoint, classes, ServeOptions(**values), allow_diagnostic == "true")


def start(app: Any, host: str, port: int, request_timeout_s: float = ServeOptions.request_timeout_s) -> str:
    """Start Serve's HTTP proxy on ``host:port`` (unless running) and deploy ``app`` at ``/``; its URL.

    The proxy's own timeout is a few seconds longer than the replicas' (which answer 503 with a reason, and
    which a client cannot lift: Serve lets a request header change the proxy's).
    """
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": request_timeout_s + 5})
    serve.run(app, name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}/"
