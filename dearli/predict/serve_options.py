"""The options of the labeling endpoint (``dearli serve``): replicas, the bounds of the work they accept, the
token, and where Label Studio's ML backend routes may read task images from."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from dearli.errors import ConfigError
from dearli.predict import label_studio_backend as lsb
from dearli.predict.labeler import SERVE_MAX_PIXELS
from dearli.predict.task_images import parse_hosts


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
    token: str = ""  # non-empty: requests need "Authorization: Bearer <token>" (or basic auth with it)
    # Label Studio's ML backend routes (see dearli.predict.task_images for where images may come from)
    max_tasks: int = lsb.MAX_TASKS  # tasks of one /predict request; more get 413
    label_studio_url: str = ""  # relative /data/... task URLs are read from here, with label_studio_token
    label_studio_token: str = ""
    fetch_hosts: str = ""  # comma-separated host[:port] whose http(s) image URLs may be fetched
    files_root: str = ""  # file:// and /data/local-files/?d= images are read below this folder only
    train_command: str = ""  # START_TRAINING submits this (formatted with {project}, ...) as a Ray job
    jobs_address: str = ""  # Ray's job API (http://head:8265); empty: $RAY_ADDRESS or the local cluster

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
        for name, token in (("--token", self.token), ("--label-studio-token", self.label_studio_token)):
            if any(not 32 < ord(c) < 127 for c in token):
                raise ConfigError(f"{name}: printable ASCII without spaces (it travels in an HTTP header)")
        if self.max_tasks < 1:
            raise ConfigError(f"--max-tasks must be at least 1, got {self.max_tasks}")
        try:
            parse_hosts(self.fetch_hosts)
        except ValueError as err:
            raise ConfigError(f"--fetch-hosts: {err}") from None
        url = urllib.parse.urlsplit(self.label_studio_url)
        if self.label_studio_url and (url.scheme not in ("http", "https") or not url.hostname or url.query):
            raise ConfigError(f"--label-studio-url must be http(s)://host[:port], got {self.label_studio_url!r}")
        if self.label_studio_token and not self.label_studio_url:
            raise ConfigError("--label-studio-token without --label-studio-url: the token would go nowhere")
        if self.files_root and not Path(self.files_root).is_dir():
            raise ConfigError(f"--files-root {self.files_root}: not a folder")
        try:
            lsb.check_template(self.train_command)
        except ValueError as err:
            raise ConfigError(f"--train-command {err}") from None
