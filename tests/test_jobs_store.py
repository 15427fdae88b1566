"""The job store's calls: cancelled, they end their task (against a real Redis); unanswered,
they fail as the broker being unreachable.

The job runner stops a job's lease renewal by cancelling it once the job's images are made; a
cancellation that a Redis call swallowed left the renewal running and the job "running" forever.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from serve_app.jobs import store as store_module
from serve_app.jobs.store import JobStore, JobStoreUnavailable

from .redis_server import RedisServer

JOB_ID = "0" * 32


def store_at(url: str) -> JobStore:
    return JobStore(url, retention_s=60, idempotency_ttl_s=60)


def test_a_store_call_cancelled_at_any_moment_ends_its_task(redis_server: RedisServer) -> None:
    async def scenario() -> list[int]:
        store = store_at(redis_server.database(3))
        stop = asyncio.Event()  # ends the renewals whose cancellation was lost

        async def renewing() -> None:
            while not stop.is_set():
                await store.renew(JOB_ID, "token", 15)

        lost = []
        try:
            for attempt in range(200):
                renewal = asyncio.create_task(renewing())
                # Cancelled at moments spread over a few round trips: sending, waiting, reading.
                await asyncio.sleep((attempt % 40) * 0.0001)
                renewal.cancel()
                done, _ = await asyncio.wait({renewal}, timeout=1)
                if not done:
                    lost.append(attempt)
        finally:
            stop.set()
            await asyncio.sleep(0.1)
            await store.close()
        return lost

    lost = asyncio.run(scenario())
    assert lost == [], f"{len(lost)} of 200 cancelled renewals went on running"


def test_a_store_call_that_gets_no_answer_is_the_broker_unreachable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(store_module, "_CALL_TIMEOUT_S", 0.3)
    # A server that takes the connection and never answers, as a hung Redis does.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]

        async def renew() -> None:
            store = store_at(f"redis://127.0.0.1:{port}/0")
            try:
                await store.renew(JOB_ID, "token", 15)
            finally:
                await store.close()

        with pytest.raises(JobStoreUnavailable, match=r"can't be reached: no answer within 0\.3 s"):
            asyncio.run(asyncio.wait_for(renew(), timeout=10))
