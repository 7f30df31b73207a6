"""Real services for tests: an ``mlflow server`` and a ``ray start --head`` on loopback, on free ports.

Each runs in a process group of its own and is stopped by that group's id when the block ends, also
when the test fails (``ray stop`` would stop every Ray instance of the machine's user, not just ours).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

BIN = Path(sys.executable).parent  # the virtualenv's console scripts (mlflow, ray)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a process from a later one that reuses its id)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _descendants(pid: int) -> dict[int, str | None]:
    """Every process below ``pid`` with its start time (Ray puts its workers in sessions of their own,
    outside our process group)."""
    found: dict[int, str | None] = {}
    todo = [pid]
    while todo:
        parent = todo.pop()
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                for kid in map(int, children.read_text().split()):
                    if kid not in found:
                        found[kid] = _start_time(kid)
                        todo.append(kid)
    return found


def _stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group we started and every process below it; SIGKILL what is left after
    ``grace_s``. Only these process ids are signalled."""
    started = _descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    time.sleep(1.0)
    started.update(_descendants(proc.pid))
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid, start in started.items():
        if start is not None and _start_time(pid) == start:  # still the process we started
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float,
               headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def mlflow_server(root: Path, timeout_s: float = 300.0) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 with a sqlite store and an artifact folder in ``root``; yields its URL."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = root / "server.log"
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    # MLflow 3's server also starts a job runner (seven Huey consumers polling sqlite, for GenAI jobs dearli
    # never asks for): 12 CPU-seconds a minute of an idle 2-core machine. cluster.yaml turns it off too.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=root, env=env,
                                start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(f"{url}/health", proc, log, timeout_s)
        yield url
    finally:
        _stop_group(proc)


def ray_env(home: Path) -> dict[str, str]:
    """The environment of both sides of a local head, as the README sets it up: the virtualenv activated
    (the job's ``python`` is the virtualenv's) and ``RAY_AUTH_MODE=token``. ``HOME`` is ``home``, so the
    token file that ``ray get-auth-token --generate`` makes is the test's, not the user's."""
    drop = ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(BIN.parent), HOME=str(home),
               RAY_AUTH_MODE="token")
    return env


@contextlib.contextmanager
def ray_head(home: Path, num_cpus: int = 4, timeout_s: float = 300.0) -> Iterator[str]:
    """``ray get-auth-token --generate`` then ``ray start --head`` on 127.0.0.1 with its own temp dir and free
    ports, in the environment ``ray_env(home)``; yields the dashboard address ``ray job submit`` takes."""
    env = ray_env(home)
    token = subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, capture_output=True,
                           text=True, check=True).stdout.strip()
    temp_dir = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths must stay under ~100 characters
    ports = {name: free_port() for name in ("port", "dashboard-port", "ray-client-server-port",
                                            "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                            "runtime-env-agent-port", "metrics-export-port", "node-manager-port",
                                            "object-manager-port")}
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
           f"--temp-dir={temp_dir}", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
           *(f"--{name}={port}" for name, port in ports.items())]
    log = Path(temp_dir) / "head.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{ports['dashboard-port']}"
        _wait_http(f"{address}/api/version", proc, log, timeout_s, {"Authorization": f"Bearer {token}"})
        yield address
    finally:
        _stop_group(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def kill_after_parts(args: list[str], out: Path, env: dict[str, str], parts: int = 2,
                     timeout_s: float = 240.0) -> int:
    """Run ``python -m dearli.cli *args`` and SIGKILL its whole process group (driver, its Ray, the
    actors) once ``out/parts`` holds ``parts`` committed Parquet parts. Returns the parts committed then."""
    log = out.parent / f"{out.name}.job.log"  # what the job said, for the message when it ends too early
    with open(log, "w") as sink:
        job = subprocess.Popen([sys.executable, "-m", "dearli.cli", *args], env=env, start_new_session=True,
                               stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while len(list((out / "parts").glob("part-*.parquet"))) < parts:
            assert job.poll() is None, (f"the job ended (exit {job.returncode}) before it could be interrupted: "
                                        f"{log.read_text()[-600:]}")
            assert time.monotonic() < deadline, "the job committed nothing in time"
            time.sleep(0.2)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    return len(list((out / "parts").glob("part-*.parquet")))
