"""A real multi-node Ray cluster on this machine: a head and worker nodes started with the real
``ray start --block``, each in its own process group, so that a test can kill one node (its
raylet and every process under it) and start it again.

The test process may already be connected to the session's Ray instance (tests/conftest.py), so
this cluster is reached only through subprocesses: the ``ray`` and ``serve`` commands, short
Python probes, and HTTP. Every port is free-picked and the temp dir is the cluster's own: other
Ray instances on the machine are never touched (no ``ray stop``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from deployments.local_cluster import free_port

RAY = str(Path(sys.executable).with_name("ray"))

# Worker processes bind ports from a range: one block per node, below the ephemeral range that
# free_port() draws from and above Ray's default range (10002-19999) that the session instance
# may use.
_WORKER_PORTS_START = 21000
_WORKER_PORTS_PER_NODE = 200

_ANSWER = "probe answer: "

# A killed node is declared dead within a few seconds instead of Ray's default of about 15.
FAST_FAILURE_DETECTION = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    # Custom metrics reach each node's Prometheus endpoint every second (tests poll them).
    "RAY_metrics_report_interval_ms": "1000",
}


@dataclass
class RayNode:
    """One node: a ``ray start --block`` process leading its own process group."""

    name: str
    arguments: list[str]
    metrics_port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def kill(self) -> None:
        """SIGKILL the node: its raylet, object store, agents and worker processes at once."""
        if self.process is None:
            return
        processes = _tree(self.process.pid)
        # Everything at once, so that nothing can notice the others die and clean up.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(processes, timeout=30)
        self.process.wait(timeout=30)
        self.process = None


def _tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (workers may leave the process group)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@dataclass
class RayCluster:
    """A head without workloads' GPUs and worker nodes with one logical GPU each."""

    temp_dir: Path
    logs: Path
    """Where each node's ``ray start`` writes its output, kept after the cluster is gone."""
    env: dict[str, str]
    gcs_port: int = field(default_factory=free_port)
    nodes: dict[str, RayNode] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def _node_arguments(self, index: int) -> list[str]:
        low = _WORKER_PORTS_START + index * _WORKER_PORTS_PER_NODE
        return [
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={self.temp_dir}",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--min-worker-port={low}",
            f"--max-worker-port={low + _WORKER_PORTS_PER_NODE - 1}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            "--object-store-memory=200000000",
            "--disable-usage-stats",
        ]

    def add_head(self, num_cpus: int, resources: dict[str, float]) -> RayNode:
        arguments = [
            "--head",
            f"--port={self.gcs_port}",
            "--include-dashboard=false",
            f"--ray-client-server-port={free_port()}",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps(resources)}",
            *self._node_arguments(len(self.nodes)),
        ]
        return self._start("head", arguments)

    def add_worker(self, name: str, num_cpus: int, num_gpus: int) -> RayNode:
        arguments = [
            f"--address={self.address}",
            f"--num-cpus={num_cpus}",
            f"--num-gpus={num_gpus}",
            f"--resources={json.dumps({name: 1})}",
            *self._node_arguments(len(self.nodes)),
        ]
        return self._start(name, arguments)

    def _start(self, name: str, arguments: list[str]) -> RayNode:
        node = RayNode(name, arguments, free_port(), self.logs / f"{name}.log")
        self.nodes[name] = node
        self.restart(node)
        return node

    def restart(self, node: RayNode) -> None:
        """Start ``node`` (again, after a kill: a new node with the same name and resources)."""
        command = [
            RAY,
            "start",
            "--block",
            f"--metrics-export-port={node.metrics_port}",
            *node.arguments,
        ]
        with node.log.open("ab") as log:
            node.process = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def probe(self, code: str, timeout_s: float = 120) -> Any:
        """Run ``code`` in a fresh Python process connected to the cluster as a driver; what it
        passes to ``answer`` (as JSON) is returned."""
        script = (
            "import json, ray\n"
            "def answer(value):\n"
            f"    print({_ANSWER!r} + json.dumps(value), flush=True)\n"
            "ray.init(address=ADDRESS, log_to_driver=False)\n"
        ) + code
        result = subprocess.run(
            [sys.executable, "-c", script.replace("ADDRESS", repr(self.address))],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"probe failed: {result.stderr[-3000:]}")
        # Ray's own log lines may come in between.
        (line,) = [line for line in result.stdout.splitlines() if line.startswith(_ANSWER)]
        return json.loads(line.removeprefix(_ANSWER))

    def alive_nodes(self) -> dict[str, str]:
        """Node id of each live node, by name (the head is "head")."""
        nodes = self.probe(
            "answer([[n['NodeID'], n['Alive'], sorted(n['Resources'])] for n in ray.nodes()])"
        )
        named = {}
        for node_id, alive, resources in nodes:
            if alive:
                name = next((r for r in resources if r in self.nodes), "head")
                named[name] = node_id
        return named

    def wait_for_nodes(self, names: set[str], timeout_s: float = 120) -> dict[str, str]:
        """Poll until exactly ``names`` are alive; their node ids."""
        deadline = time.monotonic() + timeout_s
        alive: dict[str, str] = {}
        while time.monotonic() < deadline:
            alive = self.alive_nodes()
            if set(alive) == names:
                return alive
            time.sleep(1)
        missing = "\n".join(
            f"{name}: ...{self.nodes[name].log.read_text(errors='replace')[-2000:]}"
            for name in sorted(names - set(alive))
        )
        raise TimeoutError(f"alive nodes {sorted(alive)}, wanted {sorted(names)}\n{missing}")

    def shutdown(self) -> None:
        """Stop every node of this cluster, the head last; nothing else on the machine."""
        for node in sorted(self.nodes.values(), key=lambda node: node.name == "head"):
            node.kill()


@contextlib.contextmanager
def ray_cluster(
    workers: list[str], head_resources: dict[str, float], logs: Path
) -> Iterator[RayCluster]:
    """A started head and ``workers`` (one logical GPU each), torn down however the block ends;
    the nodes' output goes to ``logs``."""
    # Short: Ray's Unix sockets live under the temp dir and their paths are limited to 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="fs-ray-"))
    env = {**os.environ, **FAST_FAILURE_DETECTION}
    env.pop("RAY_ADDRESS", None)
    logs.mkdir(parents=True, exist_ok=True)
    cluster = RayCluster(temp_dir=root / "ray", logs=logs, env=env)
    try:
        cluster.add_head(num_cpus=1, resources=head_resources)
        cluster.wait_for_nodes({"head"})
        # One at a time: raylets starting together on a busy 2-core machine can miss their 30 s
        # to register with the GCS.
        for started, name in enumerate(workers, 1):
            cluster.add_worker(name, num_cpus=2, num_gpus=1)
            cluster.wait_for_nodes({"head", *workers[:started]})
        yield cluster
    finally:
        cluster.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def text_of(code: str) -> str:
    """Dedented probe code."""
    return textwrap.dedent(code).strip() + "\n"
