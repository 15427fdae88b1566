"""A real webhook receiver for the tests: an HTTP server on 127.0.0.1 that verifies each
delivery with the standardwebhooks library, as a client would, and can refuse the first few."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook


@dataclass
class Receiver:
    """What the receiver got: verified deliveries, and attempts it refused or could not verify."""

    url: str
    secret: str
    refuse_first: int = 0
    hold_first: threading.Event | None = None
    """Set: the first attempt gets its answer only once this is set."""
    verified: list[dict[str, Any]] = field(default_factory=list)
    message_ids: list[str] = field(default_factory=list)
    attempts: list[tuple[float, str]] = field(default_factory=list)
    """Every attempt: when it arrived (time.monotonic()) and its webhook-id."""
    refused: int = 0
    unverified: int = 0
    arrived: threading.Condition = field(default_factory=threading.Condition)

    def wait_for(self, count: int, timeout_s: float) -> list[dict[str, Any]]:
        """The first ``count`` verified deliveries; TimeoutError if they do not come."""
        with self.arrived:
            if not self.arrived.wait_for(lambda: len(self.verified) >= count, timeout_s):
                raise TimeoutError(f"{len(self.verified)} of {count} webhooks arrived")
            return list(self.verified)

    def wait_for_attempts(self, count: int, timeout_s: float) -> list[tuple[float, str]]:
        """The first ``count`` attempts, answered or not; TimeoutError if they do not come."""
        with self.arrived:
            if not self.arrived.wait_for(lambda: len(self.attempts) >= count, timeout_s):
                raise TimeoutError(f"{len(self.attempts)} of {count} attempts arrived")
            return list(self.attempts)


@contextmanager
def webhook_receiver(
    secret: str, refuse_first: int = 0, hold_first: threading.Event | None = None
) -> Iterator[Receiver]:
    """Receive webhooks on 127.0.0.1 until the block ends; answer the first ``refuse_first``
    attempts with a 503, the first only once ``hold_first`` is set."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    receiver = Receiver(
        url=f"http://127.0.0.1:{server.server_address[1]}/hooks/flux",
        secret=secret,
        refuse_first=refuse_first,
        hold_first=hold_first,
    )

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            with receiver.arrived:
                receiver.attempts.append((time.monotonic(), self.headers["webhook-id"]))
                first = len(receiver.attempts) == 1
                receiver.arrived.notify_all()
            if first and receiver.hold_first is not None:
                receiver.hold_first.wait()
            with receiver.arrived:
                if receiver.refused < receiver.refuse_first:
                    receiver.refused += 1
                    self.send_response(503)
                    self.end_headers()
                    return
                try:
                    payload = Webhook(secret).verify(body, dict(self.headers.items()))
                except Exception:  # noqa: BLE001 - any failure to verify is counted
                    receiver.unverified += 1
                    self.send_response(400)
                    self.end_headers()
                    return
                receiver.verified.append(json.loads(json.dumps(payload)))
                receiver.message_ids.append(self.headers["webhook-id"])
                receiver.arrived.notify_all()
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server.RequestHandlerClass = Handler
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
