"""A real two-node Ray cluster on loopback for the multi-node tests (see tests/test_multinode.py).

Each node is a ``ray start --block`` process in its own session (so the whole node can be killed with one
process-group signal) with its own temporary folder, working directory and custom resource: the head has
``{"node_a": 10}``, the worker node ``{"node_b": 10}``. Both share one HOME (a folder of the test), so
``~/ray_results`` or anything else a node writes "at home" can be checked for.

The test process itself never calls ``ray.init``: drivers run as subprocesses (``dearli ...`` commands with
``RAY_ADDRESS``), exactly as a user runs them, so the session-wide ``ray_local`` instance of other tests
and this cluster never share a process. Node ids and liveness come from the GCS through a short-lived
client.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

NODE_NAMES = ("node_a", "node_b")
CPUS_PER_NODE = 5  # logical: 2 Train workers + 2 teacher actors + Ray Data's tasks fit on one node
# A dead node is noticed by the GCS health check: every 1 s, dead after 3 failed checks (Ray's default: 3 s, 5)
# (a live raylet still has Ray's 10 s to answer a check). A node of a busy machine may take long to register.
NODE_ENV = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
            "RAY_health_check_initial_delay_ms": "1000", "RAY_raylet_start_wait_time_s": "120"}


STARTED = b"This command will now block forever"  # what `ray start --block` prints when its node is up


def node_resources(name: str) -> dict[str, float]:
    """A node's custom resources: its name (to pin work to it) and how many Train workers, teacher actors and
    cache actors asking for one ``dearli_train`` / ``dearli_teacher`` / ``dearli_cache`` it takes (the
    capacities README's "Multi-node" and cluster.yaml describe)."""
    return {name: 10, "dearli_train": 2, "dearli_teacher": 2, "dearli_cache": 1}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Node:
    name: str
    root: Path  # <cluster root>/<name>: cwd/, tmp/ (TMPDIR), ray_start.log
    temp_dir: Path  # Ray's temporary folder (sessions, logs, sockets): a short path, for the socket names
    process: subprocess.Popen | None = None
    seen: set[tuple[int, int]] = field(default_factory=set)  # (pid, start time) of every process of its tree

    @property
    def cwd(self) -> Path:
        return self.root / "cwd"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"


class TwoNodeCluster:
    """Head ``node_a`` + worker ``node_b`` on 127.0.0.1; ``driver_env()`` is the environment of a driver."""

    def __init__(self, root: Path, cpus: int = CPUS_PER_NODE):
        self.root = root
        self.home = root / "home"
        self.cpus = cpus
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Unix socket paths are limited to 107 bytes: Ray's folders go to a short one of the system's temp dir.
        self.ray_temp = Path(tempfile.mkdtemp(prefix="ray2n-"))
        self.nodes = {name: Node(name, root / name, self.ray_temp / name) for name in NODE_NAMES}

    # -- environment -----------------------------------------------------------------------------------
    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        bin_dir = str(Path(sys.executable).parent)
        env.update(HOME=str(self.home), PATH=bin_dir + os.pathsep + env.get("PATH", ""),
                   # a local, single-user cluster: no token (the README's RAY_AUTH_MODE=disabled)
                   RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
        return env

    def driver_env(self) -> dict[str, str]:
        """A driver on this machine: RAY_ADDRESS of the head, the shared HOME."""
        return {**self._base_env(), "RAY_ADDRESS": self.address}

    # -- life cycle ------------------------------------------------------------------------------------
    def start(self) -> TwoNodeCluster:
        self.home.mkdir(parents=True, exist_ok=True)
        for name in NODE_NAMES:
            self.start_node(name)
        return self

    def start_node(self, name: str, attempts: int = 2) -> None:
        """Start node ``name`` and wait until the GCS lists it. A start that fails (on a busy machine another
        program may take one of its ports meanwhile) is killed and tried once more with new ports."""
        for attempt in range(attempts):
            try:
                return self._start_node_once(name)
            except RuntimeError:
                _kill(self.nodes[name])
                if attempt == attempts - 1:
                    raise

    def _start_node_once(self, name: str, timeout: float = 150.0) -> None:
        node = self.nodes[name]
        for folder in (node.temp_dir, node.cwd, node.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        head = name == NODE_NAMES[0]
        command = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--disable-usage-stats",
                   f"--num-cpus={self.cpus}", "--num-gpus=0", f"--resources={json.dumps(node_resources(name))}",
                   f"--temp-dir={node.temp_dir}", "--object-store-memory=150000000",
                   "--node-ip-address=127.0.0.1", "--min-worker-port=0", "--max-worker-port=0",
                   f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
                   f"--runtime-env-agent-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}"]
        # no dashboard: nothing here submits jobs, and its start costs seconds of CPU
        command += (["--head", f"--port={self.port}", "--include-dashboard=false",
                     f"--ray-client-server-port={free_port()}"] if head
                    else [f"--address={self.address}"])
        # RAY_ADDRESS: the node's processes find this cluster, not another Ray instance of the machine.
        env = {**self._base_env(), **NODE_ENV, "TMPDIR": str(node.tmp), "RAY_ADDRESS": self.address}
        log_path = node.root / "ray_start.log"
        with open(log_path, "ab") as log:
            offset = log.tell()
            node.process = subprocess.Popen(command, cwd=node.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        # `ray start` says so once the node has registered with the GCS; asking the GCS costs a Python start.
        while STARTED not in log_path.read_bytes()[offset:] or name not in self.alive_nodes():
            if node.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start:\n" + log_path.read_text()[-3000:])
            time.sleep(1.0)
        self._remember(node)

    def ensure_running(self) -> None:
        """Start again any node a test killed."""
        for name, node in self.nodes.items():
            if node.process is None or node.process.poll() is not None:
                self.start_node(name)

    def kill_node(self, name: str) -> float:
        """SIGKILL every process of node ``name`` (raylet, agents, its workers); returns the time of the kill."""
        node = self.nodes[name]
        self._remember(node)
        killed_at = time.time()
        _kill(node)
        return killed_at

    def shutdown(self) -> None:
        for node in reversed(list(self.nodes.values())):
            if node.process is not None:
                self._remember(node)
                _kill(node)
        shutil.rmtree(self.ray_temp, ignore_errors=True)

    def wait_dead(self, name: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while name in self.alive_nodes():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster still reports {name} alive")
            time.sleep(0.5)

    # -- what the cluster reports ------------------------------------------------------------------------
    def alive_nodes(self) -> dict[str, str]:
        """{node name: Ray node id} of the live nodes, from the GCS."""
        return {name: node_id for node_id, name in self._node_table() if name}

    def node_ids(self) -> dict[str, str]:
        """{Ray node id: node name} of every node the cluster has had (dead ones included)."""
        return {node_id: name for node_id, name in self._node_table(alive_only=False) if name}

    def _node_table(self, alive_only: bool = True) -> list[tuple[str, str | None]]:
        script = ("import json, sys, ray._private.state as s\n"
                  "from ray._raylet import GcsClientOptions\n"
                  "g = s.GlobalState()\n"
                  "g._initialize_global_state(GcsClientOptions.create(sys.argv[1], None, "
                  "allow_cluster_id_nil=True, fetch_cluster_id_if_nil=False))\n"
                  "print(json.dumps([[n['NodeID'], n['Alive'], sorted(n['Resources'])] for n in g.node_table()]))\n")
        if self.nodes[NODE_NAMES[0]].process is None or self.nodes[NODE_NAMES[0]].process.poll() is not None:
            return []
        out = subprocess.run([sys.executable, "-c", script, self.address], env=self._base_env(),
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            return []
        rows = json.loads(out.stdout.strip().splitlines()[-1])
        return [(node_id, next((r for r in resources if r in NODE_NAMES), None))
                for node_id, alive, resources in rows if alive or not alive_only]

    def _remember(self, node: Node) -> None:
        if node.process is not None:
            node.seen |= _descendants(node.process.pid)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the test process dies, so a killed test run leaves no node
    behind (``ray start``'s own reaper then stops the node's processes)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[19])


def _descendants(pid: int) -> set[tuple[int, int]]:
    """(pid, start time) of ``pid`` and of every process below it."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[0], []).append((int(entry.name), stat[1]))
    root = _stat(pid)
    found: set[tuple[int, int]] = set()
    todo = [(pid, root[1])] if root else []
    while todo:
        current = todo.pop()
        if current not in found:
            found.add(current)
            todo.extend(children.get(current[0], []))
    return found


def _kill(node: Node) -> None:
    """SIGKILL the node's process group and every process ever seen in its tree; reap the ``ray start``."""
    targets = node.seen | _descendants(node.process.pid)
    try:
        os.killpg(node.process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid, started in targets:
        stat = _stat(pid)
        if stat is not None and stat[1] == started:  # the same process, not a reused pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    node.process.wait(timeout=30)
