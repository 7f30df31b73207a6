"""The Ray runtime of every command and stage: joining the cluster in ``RAY_ADDRESS`` or starting a local one,
quiet logs, GPU discovery, and the actor-pool options that ``dearli cache`` and ``dearli pseudo-label`` share.
Every process that uses Ray gets there through this module.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dearli.errors import ConfigError

# Notices that are true but need no action: token authentication is on for a local instance, and
# Ray Data's progress bars are off (we print our own progress).
_NOTICE_LOGGERS = ("ray._private.authentication.authentication_token_setup", "ray.data._internal.progress")
PARQUET_FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
LOCAL_PARQUET_FOOTER_ACTORS = 2
RAY_PARQUET_FOOTER_ACTORS = 32  # Ray Data's own default, whatever the number of files
# Ray Data hands each footer actor this many files at a time (RAY_DATA_PARQUET_FOOTER_BATCH_SIZE, 10 by default).
PARQUET_FOOTER_BATCH_ENV, RAY_PARQUET_FOOTER_BATCH = "RAY_DATA_PARQUET_FOOTER_BATCH_SIZE", 10


def _hide_lost_actors(record: logging.LogRecord) -> bool:
    """False for Ray Data's console records about an actor lost with its node or process (errors with
    tracebacks): the cache job starts a new pool and says so in one line. An actor whose constructor raised
    stays visible."""
    import ray.exceptions

    # Ray Data logs some of them without exc_info, from inside the ``except`` that handles the error.
    error = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
    return not (isinstance(error, ray.exceptions.RayActorError) and not error.actor_init_failed)


def quiet(verbose: bool = False) -> None:
    """Our progress and real problems, not library internals: INFO logs (open_clip, Ray Train), Ray Data's
    progress bars and notices stay hidden unless ``verbose``; Ray's full logs stay in the session's files.
    Call it in the driver and in every worker and actor."""
    import ray.data

    level = logging.INFO if verbose else logging.WARNING
    logging.getLogger().setLevel(level)
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(level)
    for name in _NOTICE_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.ERROR)
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console; its file handler keeps everything
            handler.setLevel(level)
            (handler.removeFilter if verbose else handler.addFilter)(_hide_lost_actors)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = verbose
    context.print_on_execution_start = verbose


def ensure_ray(verbose: bool = False) -> None:
    """Connect to the cluster in RAY_ADDRESS, or start a local one, unless already connected; logs quiet.

    Without RAY_ADDRESS the instance is always a new one of this process (not whichever Ray another
    program started on the machine last), with at least 4 logical CPUs: actors and Data stages each
    hold one, and a small machine would make them wait for each other. Without ``verbose`` Ray logs
    warnings and errors only and worker output stays in Ray's log files.
    """
    local = os.environ.get("RAY_ADDRESS", "local") == "local"
    if local:
        # Ray Data reads Parquet footers with a pool of 32 actors by default (made for object stores
        # full of files): on a laptop that is 32 worker processes, raylet warnings and half a minute of
        # start-up for a cache of a few files. Set before ray.data is imported and the local Ray starts,
        # so the driver and every worker see it; a user's own setting wins.
        os.environ.setdefault(PARQUET_FOOTER_ACTORS_ENV, str(LOCAL_PARQUET_FOOTER_ACTORS))
    import ray

    quiet(verbose)
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": verbose,
                              "logging_level": logging.INFO if verbose else logging.WARNING}
    if local:
        kwargs.update(address="local", num_cpus=max(4, os.cpu_count() or 1))
    ray.init(**kwargs)


@contextmanager
def ray_session(verbose: bool = False) -> Iterator[None]:
    """Use the Ray instance already connected, or start one (RAY_ADDRESS or local) for the block only."""
    import ray

    started_here = not ray.is_initialized()
    ensure_ray(verbose)
    try:
        yield
    finally:
        if started_here:
            ray.shutdown()


def parquet_footer_actors(num_files: int) -> int:
    """Footer-reading actors worth starting for ``num_files`` Parquet files: one per batch of files Ray Data
    hands out, at most the configured pool (the user's RAY_DATA_PARQUET_FOOTER_NUM_ACTORS, else Ray's 32)."""
    batch = _env_count(PARQUET_FOOTER_BATCH_ENV, RAY_PARQUET_FOOTER_BATCH)
    pool = _env_count(PARQUET_FOOTER_ACTORS_ENV, RAY_PARQUET_FOOTER_ACTORS)
    return max(1, min(pool, math.ceil(num_files / batch)))


def _env_count(name: str, default: int) -> int:
    """The positive whole number in environment variable ``name``, else ``default``."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{name}: must be a positive whole number, not {value!r}")
    return int(value)


def read_parquet(files: list[str], filesystem=None):
    """``ray.data.read_parquet`` of ``files`` with a footer pool sized by ``parquet_footer_actors``.

    Ray Data starts its whole pool for every read, a worker process per actor, and gives work to one
    actor per batch of files: for a cache of 16 parts on a cluster that was 30 idle processes, seconds of
    start-up and raylet warnings. The pool's size is read when the read is planned, here in the driver."""
    import ray.data

    before = os.environ.get(PARQUET_FOOTER_ACTORS_ENV)
    os.environ[PARQUET_FOOTER_ACTORS_ENV] = str(parquet_footer_actors(len(files)))
    try:
        return ray.data.read_parquet(files, filesystem=filesystem)
    finally:
        if before is None:
            del os.environ[PARQUET_FOOTER_ACTORS_ENV]
        else:
            os.environ[PARQUET_FOOTER_ACTORS_ENV] = before


def cluster_gpus() -> float:
    """GPUs of the Ray cluster (all nodes)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def cluster_has_gpus() -> bool:
    return cluster_gpus() > 0


def gpu_share(gpus: float, users: int) -> float:
    """GPUs for each of ``users`` processes (Train workers and teacher actors) that all want one.

    1 where there are enough; else the same fraction for all, 1/k with k users per GPU, so that the fractions
    of one GPU add up to at most 1 (Ray places a fractional request on a single GPU). One GPU and one Train
    worker + one teacher actor, the paper's setting: 0.5 each, both on that GPU. No GPU: 0.
    """
    if gpus < 1 or users < 1:
        return 0.0
    return 1.0 if gpus >= users else 1.0 / math.ceil(users / int(gpus))


def default_gpus_per_actor() -> float:
    """1 when the Ray cluster has GPUs, else 0 (CPU actors)."""
    return 1.0 if cluster_has_gpus() else 0.0


def add_actor_pool_arguments(parser: argparse.ArgumentParser, resource_example: str) -> None:
    """The options of a command that runs an actor pool over images: --actors, --gpus-per-actor, --resources,
    --max-pixels, --verbose."""
    parser.add_argument("--actors", type=int, default=1, metavar="N",
                        help="actors in the pool, each holding one copy of the model (default: 1)")
    parser.add_argument("--gpus-per-actor", type=float, default=None, metavar="G",
                        help="GPUs per actor (default: 1 if the cluster has GPUs, else 0 = CPU)")
    parser.add_argument("--resources", default=None, metavar="JSON",
                        help=f"custom Ray resources per actor, e.g. '{{\"{resource_example}\": 1}}': the actors run "
                        "only on nodes that offer them (default: any node)")
    parser.add_argument("--max-pixels", type=int, default=None, metavar="P",
                        help="images with more pixels are recorded as failures (default: 64M)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own logs and progress bars (default: warnings and our progress only)")
