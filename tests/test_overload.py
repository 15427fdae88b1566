"""Overload that wastes no work, on the real Ray Serve instance: bursts against config/serve.yaml's
application get 200s within their deadline and quick 503s, never a 504 or a 500, and small
requests beside a huge one are served while it runs.
"""

from __future__ import annotations

import asyncio
import copy
import os
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import yaml

from deployments.local_cluster import deploy, wait_until_ready
from serve_app.client.events import aread_events

from .conftest import ROOT, ServeCluster

pytestmark = pytest.mark.ray

# The shipped deadline is 300 s; a shorter one keeps the admitted work (at most 80% of it) within
# CI's time and changes nothing else. FLUX_OVERLOAD_DEADLINE_S=300 runs the bursts at the shipped
# deadline (scripts/test.sh tests/test_overload.py -s prints the figures).
DEADLINE_S = int(os.environ.get("FLUX_OVERLOAD_DEADLINE_S", "60"))
BURST = {"prompt": "a red cat", "nof_images": 16, "width": 512, "height": 512}
WARM_UP = {**BURST, "nof_images": 2}


@pytest.fixture(scope="module")
def burst_url(
    serve_cluster: ServeCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """config/serve.yaml's application once more, as "burst" under /burst with the shorter
    deadline, deployed beside the session's with the real serve run (which leaves it as it is)."""
    work = tmp_path_factory.mktemp("burst")
    config = yaml.safe_load(serve_cluster.config_path.read_text())
    burst = copy.deepcopy(config["applications"][0])
    burst.update(name="burst", route_prefix="/burst")
    env = burst["runtime_env"]["env_vars"]
    env["FLUX_SERVE_REQUEST_TIMEOUT_S"] = str(DEADLINE_S)
    env["FLUX_SERVE_STORAGE_DIR"] = str(work / "images")
    # Its jobs (none here) in a Redis database of their own, apart from the session's.
    env["FLUX_SERVE_REDIS_URL"] = serve_cluster.redis.database(2)
    for deployment in burst["deployments"]:
        policy = deployment.get("autoscaling_config", {}).get("policy")
        if policy:
            policy["policy_kwargs"]["broker_url"] = env["FLUX_SERVE_REDIS_URL"]
    config["applications"].append(burst)
    config_path = work / "serve.yaml"
    config_path.write_text(yaml.safe_dump(config))
    deploy(config_path, serve_cluster.gcs_address, ROOT)
    url = f"{serve_cluster.url}/burst"
    try:
        wait_until_ready(url, timeout_s=240)
        yield url
    finally:
        # The session's config alone: Serve deletes the application it no longer lists.
        deploy(serve_cluster.config_path, serve_cluster.gcs_address, ROOT)


@dataclass(frozen=True)
class Outcome:
    status: int
    seconds: float
    """From sending the request to its whole answer."""
    finished: float
    """time.monotonic() when the answer was complete."""
    body: Any
    retry_after: str | None


async def send(client: httpx.AsyncClient, url: str, payload: dict[str, Any]) -> Outcome:
    started = time.monotonic()
    response = await client.post(f"{url}/generate", json=payload)
    finished = time.monotonic()
    # The proxy's own refusals are plain text: kept as they are, for the assertion to show.
    json_body = response.headers.get("content-type", "").startswith("application/json")
    return Outcome(
        response.status_code,
        finished - started,
        finished,
        response.json() if json_body else response.text,
        response.headers.get("Retry-After"),
    )


def client() -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    return httpx.AsyncClient(timeout=DEADLINE_S * 3, limits=limits)


def summary(outcomes: list[Outcome]) -> str:
    """Counts and latencies by status, for the report."""
    parts = []
    for status, count in sorted(Counter(o.status for o in outcomes).items()):
        seconds = [o.seconds for o in outcomes if o.status == status]
        parts.append(
            f"{count} x {status} (median {statistics.median(seconds):.2f} s, "
            f"max {max(seconds):.2f} s)"
        )
    return ", ".join(parts)


def test_a_burst_of_large_requests_gets_200s_in_time_and_quick_503s(burst_url: str) -> None:
    async def scenario() -> tuple[Outcome, list[Outcome], float]:
        async with client() as http:
            # A newcomer tried a smaller request first (the burst's own would not fit the
            # deadline at the speed assumed before any is measured): a worker's speed is known.
            warm = await send(http, burst_url, WARM_UP)
            started = time.monotonic()
            outcomes = await asyncio.gather(*(send(http, burst_url, BURST) for _ in range(60)))
            return warm, outcomes, time.monotonic() - started

    warm, outcomes, elapsed = asyncio.run(scenario())
    assert warm.status == 200, warm.body
    admitted = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status == 503]
    waits = sorted({int(o.retry_after or 0) for o in refused})
    print(
        f"\nburst: 60 x 16 images at 512x512, deadline {DEADLINE_S} s: {summary(outcomes)}; "
        f"all answered in {elapsed:.1f} s; Retry-After {waits[0]} to {waits[-1]} s"
    )
    assert len(admitted) + len(refused) == 60, summary(outcomes)
    assert admitted, "nothing was admitted"
    assert refused, "60 requests fit the deadline: the burst tests nothing"
    for outcome in admitted:
        assert outcome.body["count"] == 16
    for outcome in refused:
        assert isinstance(outcome.body, dict), outcome.body
        assert outcome.body["error"]["type"] == "overloaded"
        assert int(outcome.retry_after or 0) >= 1
    # The refused clients did not wait for anything: every refusal came before the first image
    # set was done.
    assert max(o.finished for o in refused) < min(o.finished for o in admitted)


def test_one_image_requests_beside_a_huge_one_are_not_starved(burst_url: str) -> None:
    huge = {"prompt": "a huge request", "nof_images": 64, "gpus": 2, "stream": True}
    small = {"prompt": "a small request", "nof_images": 1}
    started = asyncio.Event()
    arrivals: list[float] = []

    async def huge_request(http: httpx.AsyncClient) -> list[float]:
        """When each of its images arrived."""
        async with http.stream("POST", f"{burst_url}/generate", json=huge) as response:
            assert response.status_code == 200
            async for event in aread_events(response.aiter_lines()):
                if event.event == "image":
                    arrivals.append(time.monotonic())
                    started.set()
                else:
                    assert event.event == "result", event.data
        return arrivals

    async def scenario() -> tuple[list[float], list[Outcome]]:
        async with client() as http:
            warm = await send(http, burst_url, WARM_UP)  # as above, should it run alone
            assert warm.status == 200, warm.body
            running = asyncio.create_task(huge_request(http))
            first_image = asyncio.create_task(started.wait())
            await asyncio.wait({running, first_image}, return_when=asyncio.FIRST_COMPLETED)
            if running.done():  # ended before its first image: its failure is the test's
                first_image.cancel()
                await running
            smalls = await asyncio.gather(*(send(http, burst_url, small) for _ in range(20)))
            return await running, smalls

    huge_arrivals, smalls = asyncio.run(scenario())
    last_small = max(o.finished for o in smalls)
    huge_before = sum(1 for arrived in huge_arrivals if arrived <= last_small)
    print(
        f"\nbeside a 64-image request: 20 one-image requests: {summary(smalls)}; "
        f"the large one had made {huge_before} of its images when the last ended"
    )
    assert len(huge_arrivals) == 64
    assert [o.status for o in smalls] == [200] * 20, summary(smalls)
    # They took turns with the huge request's batches (and rode in them) rather than waiting for
    # it: measured by its progress, not its end, which a slow moment of the machine can move.
    assert huge_before <= 48, f"the last one-image request ended after {huge_before} of 64"
