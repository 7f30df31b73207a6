"""The labeling endpoint on Ray Serve: :class:`~dearli.predict.labeler.Labeler` replicas behind Serve's proxy.

``dearli serve`` starts it (see :mod:`dearli.predict.serve_command`); Serve's own tools work too::

    serve run dearli.predict.serve:app_builder checkpoint=models:/dearli/1 replicas=2

POST ``/`` with an image file (or the JSON of :mod:`dearli.predict.labeler`) answers COCO panoptic JSON; GET
``/`` answers the served class list. A bad request gets a 4xx JSON ``{"error": reason}``; the replica stays up.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from dearli.caches.records import DEFAULT_MAX_PIXELS
from dearli.data.panoptic import CategoryMap
from dearli.device import resolve_device
from dearli.errors import ConfigError
from dearli.predict.labeler import MAX_REQUEST_BYTES, Labeler, RequestError

APP_NAME = "dearli"


@dataclass(frozen=True)
class ServeOptions:
    """How many replicas, on what. ``max_replicas`` above ``replicas`` turns on Serve's autoscaling between
    the two (``target_ongoing_requests`` per replica)."""

    replicas: int = 1
    max_replicas: int = 0  # 0 = no autoscaling: exactly ``replicas``
    gpus_per_replica: float = -1.0  # -1 = 1 when the cluster has GPUs, else 0
    cpus_per_replica: float = 1.0
    max_ongoing_requests: int = 8  # requests a replica holds at once (one runs the model, the rest queue)
    target_ongoing_requests: float = 2.0  # autoscaling: add replicas above this many requests each
    max_pixels: int = DEFAULT_MAX_PIXELS

    def validate(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"--replicas must be at least 1, got {self.replicas}")
        if self.max_replicas and self.max_replicas < self.replicas:
            raise ConfigError(f"--max-replicas ({self.max_replicas}) must be at least --replicas ({self.replicas})")
        if self.cpus_per_replica <= 0 or (self.gpus_per_replica < 0 and self.gpus_per_replica != -1):
            raise ConfigError("--cpus-per-replica must be positive and --gpus-per-replica -1 (auto) or >= 0")
        if self.max_ongoing_requests < 1:
            raise ConfigError(f"--max-ongoing-requests must be at least 1, got {self.max_ongoing_requests}")


@serve.deployment(name="labeler")
class LabelingService:
    """One replica: the model of a checkpoint payload, labeling with ``classes`` unless a request brings its own."""

    def __init__(self, payload: dict[str, Any], classes: list[dict], max_pixels: int):
        self.labeler = Labeler(payload, CategoryMap.from_dicts(classes, "served classes"),
                               str(resolve_device()), max_pixels)
        self.classes = classes

    async def __call__(self, request: Request) -> JSONResponse:
        if request.method == "GET":
            return JSONResponse({"classes": self.classes})
        if request.method != "POST":
            return JSONResponse({"error": f"{request.method} is not served: POST an image, GET the classes"},
                                status_code=405)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_REQUEST_BYTES:
            return JSONResponse({"error": f"request body of {declared} bytes exceeds {MAX_REQUEST_BYTES}"},
                                status_code=413)
        body = await request.body()
        try:
            # The model runs in a thread so the replica keeps accepting (and refusing) requests meanwhile.
            answer = await asyncio.to_thread(self.labeler.label, body, request.headers.get("content-type", ""))
        except RequestError as err:
            return JSONResponse({"error": err.reason}, status_code=err.status)
        return JSONResponse(answer)


def build_app(checkpoint: str, classes_file: str | None = None, options: ServeOptions = ServeOptions()) -> Any:
    """The Serve application of a checkpoint file or registered model (``models:/dearli/N``).

    The checkpoint is read here, on the driver, and handed to the replicas by value: replicas on other
    nodes need no shared file system.
    """
    from dearli.predict.commands import checkpoint_file
    from dearli.predict.pseudo_label_command import resolve_classes
    from dearli.predict.worker import model_payload
    from dearli.runtime import default_gpus_per_actor
    from dearli.training.checkpoint import load_checkpoint

    options.validate()
    payload = model_payload(load_checkpoint(checkpoint_file(checkpoint), "cpu"))
    classes = [c.to_dict() for c in resolve_classes(classes_file, payload["config"]).categories]
    gpus = default_gpus_per_actor() if options.gpus_per_replica == -1 else options.gpus_per_replica
    scaling: dict[str, Any] = {"num_replicas": options.replicas}
    if options.max_replicas > options.replicas:
        scaling = {"autoscaling_config": {"min_replicas": options.replicas, "max_replicas": options.max_replicas,
                                          "target_ongoing_requests": options.target_ongoing_requests}}
    deployment = LabelingService.options(
        ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": gpus},
        max_ongoing_requests=options.max_ongoing_requests, **scaling)
    return deployment.bind(payload, classes, options.max_pixels)


def app_builder(args: dict[str, str]) -> Any:
    """``serve run dearli.predict.serve:app_builder checkpoint=... [classes=FILE] [replicas=N] ...``."""
    args = dict(args)
    checkpoint = args.pop("checkpoint", None)
    if not checkpoint:
        raise ConfigError("serve run: pass checkpoint=FILE or checkpoint=models:/dearli/N")
    classes = args.pop("classes", None)
    fields = ServeOptions.__dataclass_fields__
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise ConfigError(f"serve run: unknown argument(s) {', '.join(unknown)}; known: checkpoint, classes, "
                          f"{', '.join(fields)}")
    values = {name: type(getattr(ServeOptions(), name))(value) for name, value in args.items()}
    return build_app(checkpoint, classes, ServeOptions(**values))


def start(app: Any, host: str, port: int) -> str:
    """Start Serve's HTTP proxy on ``host:port`` (unless running) and deploy ``app`` at ``/``; its URL."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}/"
