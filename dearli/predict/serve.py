"""The labeling endpoint on Ray Serve: :class:`~dearli.predict.labeler.Labeler` replicas behind Serve's proxy.

``dearli serve`` starts it (see :mod:`dearli.predict.serve_command`); Serve's own tools work too::

    serve run dearli.predict.serve:app_builder checkpoint=models:/dearli/1 replicas=2

POST ``/`` with an image file (or the JSON of :mod:`dearli.predict.labeler`) answers COCO panoptic JSON; GET
``/`` answers the served class list. A bad request gets a 4xx JSON ``{"error": reason}``; the replica stays up.

Under load: a replica holds ``max_ongoing_requests`` requests (one labeled at a time), Serve queues
``max_queued_requests`` more and answers 429 with ``Retry-After`` past that; a request still unanswered after
``request_timeout_s`` gets a 503 and its work stops, as does the work of a client that disconnects (Serve
cancels it; the model checks between its steps). With a token, every request needs
``Authorization: Bearer TOKEN`` (401 otherwise).
"""

from __future__ import annotations

import asyncio
import hmac
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.serve.config import BackpressureConfig
from starlette.requests import Request
from starlette.responses import JSONResponse

from dearli.data.panoptic import CategoryMap
from dearli.device import resolve_device
from dearli.errors import ConfigError, DataError
from dearli.predict.labeler import MAX_REQUEST_BYTES, SERVE_MAX_PIXELS, Labeler, RequestError

TOKEN_ENV = "DEARLI_SERVE_TOKEN"  # the token dearli serve reads when --token is not given
RETRY_AFTER_S = 1  # what a 429 or 503 tells the client to wait

APP_NAME = "dearli"


@dataclass(frozen=True)
class ServeOptions:
    """How many replicas, on what, and the bounds of the work they accept. ``max_replicas`` above ``replicas``
    turns on Serve's autoscaling between the two (``target_ongoing_requests`` per replica)."""

    replicas: int = 1
    max_replicas: int = 0  # 0 = no autoscaling: exactly ``replicas``
    gpus_per_replica: float = -1.0  # -1 = 1 when the cluster has GPUs, else 0
    cpus_per_replica: float = 1.0
    max_ongoing_requests: int = 8  # requests a replica holds at once (one runs the model, the rest wait)
    max_queued_requests: int = 32  # requests Serve queues for the replicas; more get 429 (-1: no bound)
    request_timeout_s: float = 60.0  # a request not answered by then gets 503 and its work stops
    target_ongoing_requests: float = 2.0  # autoscaling: add replicas above this many requests each
    max_pixels: int = SERVE_MAX_PIXELS
    token: str = ""  # non-empty: requests need "Authorization: Bearer <token>"

    def validate(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"--replicas must be at least 1, got {self.replicas}")
        if self.max_replicas and self.max_replicas < self.replicas:
            raise ConfigError(f"--max-replicas ({self.max_replicas}) must be at least --replicas ({self.replicas})")
        if self.cpus_per_replica <= 0 or (self.gpus_per_replica < 0 and self.gpus_per_replica != -1):
            raise ConfigError("--cpus-per-replica must be positive and --gpus-per-replica -1 (auto) or >= 0")
        if self.max_ongoing_requests < 1:
            raise ConfigError(f"--max-ongoing-requests must be at least 1, got {self.max_ongoing_requests}")
        if self.max_queued_requests < 1 and self.max_queued_requests != -1:
            raise ConfigError(f"--max-queued-requests must be at least 1 (or -1: no bound), got "
                              f"{self.max_queued_requests}")
        if not self.request_timeout_s > 0:
            raise ConfigError(f"--request-timeout-s must be positive, got {self.request_timeout_s}")
        if self.max_pixels < 1:
            raise ConfigError(f"--max-pixels must be positive, got {self.max_pixels}")
        if self.token != self.token.strip() or any(not 32 < ord(c) < 127 for c in self.token):
            raise ConfigError("--token: printable ASCII without spaces (it travels in an HTTP header)")


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


@serve.deployment(name="labeler")
class LabelingService:
    """One replica: the model of a checkpoint payload, labeling with ``classes`` unless a request brings its own."""

    def __init__(self, payload: dict[str, Any], classes: list[dict], options: ServeOptions):
        self.labeler = Labeler(payload, CategoryMap.from_dicts(classes, "served classes"),
                               str(resolve_device()), options.max_pixels)
        self.classes = classes
        self.options = options
        self.text_lock = asyncio.Lock()  # one new class list encoded at a time; served-list requests never wait
        self.model_lock = asyncio.Lock()  # waiters queue here, where a client's disconnect cancels at once

    def _authorized(self, request: Request) -> bool:
        if not self.options.token:
            return True
        given = request.headers.get("authorization", "").encode("latin-1", "replace")
        return hmac.compare_digest(given, f"Bearer {self.options.token}".encode())

    async def __call__(self, request: Request) -> JSONResponse:
        if not self._authorized(request):
            return _error(401, "this endpoint needs 'Authorization: Bearer <token>'")
        if request.method == "GET":
            return JSONResponse({"classes": self.classes})
        if request.method != "POST":
            return _error(405, f"{request.method} is not served: POST an image, GET the classes")
        cancelled = threading.Event()

        def check() -> None:  # called by the model between its steps, in the worker thread
            if cancelled.is_set():
                raise RequestError(503, "the request was cancelled")

        try:
            body = await read_body(request)
            answer = await asyncio.wait_for(self._label(body, request.headers.get("content-type", ""), check),
                                            self.options.request_timeout_s)
        except RequestError as err:
            return _error(err.status, err.reason)
        except asyncio.TimeoutError:
            cancelled.set()
            return _error(503, f"not labeled within {self.options.request_timeout_s:g} s: the endpoint is busy",
                          retry=True)
        except BaseException:  # the client went (Serve cancels the task), or a fault of ours: stop the work
            cancelled.set()
            raise
        return JSONResponse(answer)

    async def _label(self, body: bytes, content_type: str, check: Any) -> dict[str, Any]:
        prepared = await asyncio.to_thread(self.labeler.prepare, body, content_type)
        if prepared.categories is None:
            text = self.labeler.default_text
        else:
            async with self.text_lock:
                text = await asyncio.to_thread(self.labeler.text_of, prepared)
        async with self.model_lock:
            return await asyncio.to_thread(self.labeler.run, prepared, text, check)


def serving_payload(checkpoint: str, allow_diagnostic: bool = False) -> dict[str, Any]:
    """The model payload of a checkpoint file or registered model (``models:/dearli/N``), read on the driver.

    A diagnostic is no model to serve: a model version tagged ``dearli.diagnostic``, or a checkpoint of a run
    whose student trained on the ground truth of its unlabeled images (``ssl.oracle_labels``). DataError (one
    line) unless ``allow_diagnostic``; then it is served with a warning on stderr.
    """
    from dearli.predict.worker import model_payload
    from dearli.stages.registry import resolve_model
    from dearli.stages.tracking import DIAGNOSTIC_TAG
    from dearli.training.checkpoint import load_checkpoint

    path, tags = resolve_model(checkpoint)
    payload = model_payload(load_checkpoint(path, "cpu"))
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


def build_app(checkpoint: str, classes_file: str | None = None, options: ServeOptions = ServeOptions(),
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
    from dearli.predict.pseudo_label_command import resolve_classes
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
    [allow_diagnostic=true]``; the token is ``token=...`` or ``$DEARLI_SERVE_TOKEN``. The proxy's timeout is
    then Serve's own setting."""
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
    values: dict[str, Any] = {"token": os.environ.get(TOKEN_ENV, "")}
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
