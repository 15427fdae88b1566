"""The application over real HTTP: uvicorn in a background thread on 127.0.0.1, and addresses
where a service is down or hung, for the client, the CLI and the browser."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

from serve_app.schemas import Readiness

STARTUP_DEADLINE_S = 30.0


async def always_ready() -> Readiness:
    return Readiness(ready=True, detail="ok")


def _url(bound: socket.socket) -> str:
    host, port = bound.getsockname()[:2]
    return f"http://{host}:{port}"


@contextmanager
def serve_over_http(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` until the block ends; yields its base URL."""
    # Listening before the server starts: the port is ours, with no window for another process.
    listener = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [listener]}, name="uvicorn", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not server.started:
            raise RuntimeError("uvicorn did not start; see the captured log")
        yield _url(listener)
    finally:
        server.should_exit = True
        thread.join(timeout=STARTUP_DEADLINE_S)
        listener.close()


@contextmanager
def refusing_address() -> Iterator[str]:
    """A URL where nothing listens, so connections are refused: a service that is down."""
    with socket.socket() as bound:
        # Bound but not listening: refused, and no other process can take the port meanwhile.
        bound.bind(("127.0.0.1", 0))
        yield _url(bound)


@contextmanager
def silent_address() -> Iterator[str]:
    """A URL that accepts connections (the kernel does) but never answers: a hung service."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield _url(listener)
