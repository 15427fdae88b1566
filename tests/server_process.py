"""A server process the tests start, and stop either gracefully or like a crash."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

Server = TypeVar("Server", bound="ServerProcess")


@dataclass
class ServerProcess:
    """Holds the running server's process, if any."""

    process: subprocess.Popen[bytes] | None = field(default=None, kw_only=True)

    def start(self) -> None:
        """Start the server and wait until it answers (each kind of server says how)."""
        raise NotImplementedError

    def kill(self) -> None:
        """Stop at once, like a crashed server."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        """Stop gracefully; kill it if it takes too long."""
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
            self.process = None


@contextmanager
def running(server: Server) -> Iterator[Server]:
    """``server`` started for the block, stopped after it."""
    server.start()
    try:
        yield server
    finally:
        server.stop()
