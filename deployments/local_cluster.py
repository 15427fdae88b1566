"""A Serve config deployed on a Ray instance of this machine: for the tests and the benchmark."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def deploy(config_path: Path, gcs_address: str, project_root: Path) -> None:
    """Deploy ``config_path`` on the Ray instance at ``gcs_address``, with the real serve run."""
    serve = Path(sys.executable).with_name("serve")
    command = [str(serve), "run", "--non-blocking", "--address", gcs_address, str(config_path)]
    result = subprocess.run(
        command, cwd=project_root, capture_output=True, text=True, timeout=300, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"serve run failed ({result.returncode}): {result.stderr[-2000:]}")


def wait_until_ready(url: str, timeout_s: float) -> None:
    """Poll ``url``/healthz until it answers 200; TimeoutError with the last answer otherwise."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/healthz", timeout=5)
            if response.status_code == 200:
                return
            last = response.text
        except httpx.HTTPError as error:
            last = repr(error)
        time.sleep(1)
    raise TimeoutError(f"the application at {url} did not become ready: {last}")
