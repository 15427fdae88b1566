"""The Redis that scripts/serve.sh starts: reused when it runs, started again after a crash (its
stale pid file notwithstanding), with the data it had."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from deployments.local_cluster import free_port
from deployments.local_redis import answers, ensure_redis, main


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    folder, port = tmp_path / "redis", free_port()
    try:
        yield folder, port
    finally:
        pid_file = folder / "redis.pid"
        if answers(port) and pid_file.is_file():
            os.kill(int(pid_file.read_text()), signal.SIGTERM)


def test_it_is_reused_while_up_and_started_again_after_a_crash_with_its_data(
    daemon: tuple[Path, int],
) -> None:
    folder, port = daemon
    assert ensure_redis(folder, port) is True
    redis.Redis(port=port).set("queued-job", "kept")
    assert ensure_redis(folder, port) is False  # running: reused
    pid_file = folder / "redis.pid"
    os.kill(int(pid_file.read_text()), signal.SIGKILL)  # a crash leaves its pid file behind
    deadline = time.monotonic() + 30
    while answers(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pid_file.is_file()
    assert ensure_redis(folder, port) is True
    assert redis.Redis(port=port).get("queued-job") == b"kept"  # from the append-only file


def test_the_command_starts_the_redis_a_serve_config_names(
    daemon: tuple[Path, int], tmp_path: Path
) -> None:
    folder, port = daemon
    config = tmp_path / "serve.yaml"
    config.write_text(
        "applications:\n  - runtime_env:\n      env_vars:\n"
        f"        FLUX_SERVE_REDIS_URL: redis://127.0.0.1:{port}/0\n"
    )
    assert main([str(config), "--dir", str(folder)]) == 0
    assert answers(port)
