"""scripts/serve.sh --private and scripts/stop.sh, run as a user runs them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from deployments.local_cluster import free_port, wait_until_ready

from .conftest import ROOT

pytestmark = pytest.mark.ray

# What serve run prints when it is killed rather than shut down, and what the replicas' logs
# must not carry on a plain start.
NOISE = ("SIGTERM received", "Traceback", "requires torchvision")


def run(*command: str) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=60).stdout


def descendants(root: int) -> set[int]:
    """The processes started, directly or not, by process ``root``."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name, in parentheses, may hold spaces: the fields after it are plain.
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: set[int] = set()
    waiting = [root]
    while waiting:
        for child in children.get(waiting.pop(), []):
            found.add(child)
            waiting.append(child)
    return found


def command_name(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None  # ended meanwhile


def network_namespace(pid: int) -> int:
    """The inode of the network namespace process ``pid`` is in."""
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def processes_in(namespace: int) -> list[int]:
    """Every process in the network namespace with inode ``namespace``."""
    found = []
    for link in Path("/proc").glob("[0-9]*/ns/net"):
        try:
            if link.stat().st_ino == namespace:
                found.append(int(link.parent.parent.name))
        except OSError:
            continue
    return found


@dataclass(frozen=True)
class PrivateService:
    """scripts/serve.sh --private, running: the script, its URL and output, and its pid file."""

    script: subprocess.Popen[bytes]
    url: str
    output: Path
    pid_file: Path

    def stop(self) -> subprocess.CompletedProcess[bytes]:
        """scripts/stop.sh, as a user runs it."""
        env = {**os.environ, "FLUX_SERVE_PID_FILE": str(self.pid_file)}
        return subprocess.run(
            [str(ROOT / "scripts" / "stop.sh")], env=env, timeout=240, check=False
        )


@pytest.fixture
def private_service(tmp_path: Path) -> Iterator[PrivateService]:
    """scripts/serve.sh --private on a free port, stopped at the end if the test did not."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("socat"):
        pytest.skip("--private needs root, iproute2 and socat (scripts/system-deps.sh)")
    port = free_port()
    pid_file = tmp_path / "serve.pid"
    output = tmp_path / "serve.log"
    with output.open("wb") as log:
        script = subprocess.Popen(
            [str(ROOT / "scripts" / "serve.sh"), "--private", "--port", str(port)],
            cwd=ROOT,
            env={**os.environ, "FLUX_SERVE_PID_FILE": str(pid_file)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    service = PrivateService(script, f"http://127.0.0.1:{port}", output, pid_file)
    try:
        yield service
    finally:
        if script.poll() is None:
            service.stop()
            script.wait(timeout=60)


def test_private_mode_keeps_ray_off_the_network_and_stops_cleanly(
    private_service: PrivateService,
) -> None:
    script, url = private_service.script, private_service.url
    wait_until_ready(url, timeout_s=300)
    answer = httpx.post(
        f"{url}/generate",
        json={"prompt": "a red cat", "nof_images": 1, "width": 64, "height": 64},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    assert httpx.get(answer.json()["images"][0]["url"], timeout=30).content.startswith(b"\x89PNG")

    started = descendants(script.pid)
    names = {pid: command_name(pid) for pid in started}
    (gcs,) = [pid for pid, name in names.items() if name == "gcs_server"]
    private = network_namespace(gcs)
    assert private != network_namespace(os.getpid())
    # Ray's processes are in a namespace whose one interface is loopback: no port of theirs can
    # be reached from another machine, whatever address they bind.
    inside = processes_in(private)
    assert {"gcs_server", "raylet"} <= {names.get(pid) for pid in inside}
    namespace = f"flux-serve-{script.pid}"
    links = run("ip", "netns", "exec", namespace, "ip", "-o", "link", "show")
    assert re.findall(r"^\d+: (\S+?):", links, re.MULTILINE) == ["lo"]
    # Out here the service listens only on the relay's 127.0.0.1 port.
    listeners = run("ss", "-Hltnp").splitlines()
    ours = [line for line in listeners if any(f"pid={pid}," in line for pid in started)]
    assert [line.split()[3] for line in ours] == [url.removeprefix("http://")]

    assert private_service.stop().returncode == 0
    assert script.wait(timeout=60) == 0
    log = private_service.output.read_text(errors="replace")
    assert "Got KeyboardInterrupt, shutting down" in log  # serve run's own clean path
    assert not [noise for noise in NOISE if noise in log], log[-3000:]
    assert namespace not in run("ip", "netns", "list")
    assert processes_in(private) == []
    assert not private_service.pid_file.exists()
