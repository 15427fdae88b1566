"""A server process the tests start, and stop either gracefully or like a crash."""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass, field


@dataclass
class ServerProcess:
    """Holds the running server's process, if any."""

    process: subprocess.Popen[bytes] | None = field(default=None, kw_only=True)

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
