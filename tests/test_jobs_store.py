"""The job store against a real Redis: a store call that is cancelled ends its task.

The job runner stops a job's lease renewal by cancelling it once the job's images are made; a
cancellation that a Redis call swallowed left the renewal running and the job "running" forever.
"""

from __future__ import annotations

import asyncio

from serve_app.jobs.store import JobStore

from .redis_server import RedisServer

JOB_ID = "0" * 32


def test_a_store_call_cancelled_at_any_moment_ends_its_task(redis_server: RedisServer) -> None:
    async def scenario() -> list[int]:
        store = JobStore(redis_server.database(3), retention_s=60, idempotency_ttl_s=60)
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
