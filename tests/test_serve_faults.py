"""Faults and load on the real Ray Serve instance: killed replicas, 200 requests at once-ish."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from serve_app.client.events import aread_events

from .conftest import ServeCluster, extra_application
from .metrics import growth, images_by_replica, memory_by_process
from .midway import loses_no_image_when

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def fault_app(
    serve_cluster: ServeCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """A second application with two FluxWorker replicas, to kill one of them."""
    storage = tmp_path_factory.mktemp("fault-images")
    env = {
        "FLUX_SERVE_CACHE_DIR": os.environ["FLUX_SERVE_CACHE_DIR"],
        "FLUX_SERVE_STORAGE_DIR": str(storage),
        "FLUX_SERVE_DEFAULT_WIDTH": "128",
        "FLUX_SERVE_DEFAULT_HEIGHT": "128",
        # Long enough for Serve to replace a killed single Scorer replica.
        "FLUX_SERVE_MAX_RETRIES": "6",
        "FLUX_SERVE_REDIS_URL": serve_cluster.redis.url,
    }
    with extra_application("faults", env) as prefix:
        yield f"{serve_cluster.url}{prefix}", storage


def images_each_replica_made(
    metrics_url: str, expected: int, requests: Callable[[], None]
) -> list[float]:
    """How many images each FluxWorker replica of the fault application made while
    ``requests`` ran, which make ``expected`` images in all; sorted."""
    # Metrics are exported once a second: wait until earlier counts have settled.
    before: dict[str, float] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        current = images_by_replica(metrics_url, "faults")
        if current == before and current:
            break
        before = current
        time.sleep(1.5)
    requests()
    deadline = time.monotonic() + 60
    grown: dict[str, float] = {}
    while time.monotonic() < deadline:
        after = images_by_replica(metrics_url, "faults")
        grown = {r: n - before.get(r, 0.0) for r, n in after.items() if n > before.get(r, 0.0)}
        if sum(grown.values()) >= expected:
            break
        time.sleep(1)
    return sorted(grown.values())


def test_gpus_spreads_a_request_over_distinct_replicas(
    serve_cluster: ServeCluster, fault_app: tuple[str, Path]
) -> None:
    url, _ = fault_app
    payload = {"prompt": "a red cat", "nof_images": 8, "gpus": 2, "width": 64, "height": 64}

    def one_request() -> None:
        assert httpx.post(f"{url}/generate", json=payload, timeout=120).status_code == 200

    # Two shards of four jobs, each on its own replica.
    assert images_each_replica_made(serve_cluster.metrics_url, 8, one_request) == [4.0, 4.0]


def test_a_burst_of_requests_is_shared_evenly_between_the_workers(
    serve_cluster: ServeCluster, fault_app: tuple[str, Path]
) -> None:
    url, _ = fault_app
    payload = {"prompt": "a red cat", "nof_images": 8, "width": 128, "height": 128}

    def burst() -> None:
        async def send() -> list[int]:
            async with httpx.AsyncClient(timeout=120) as client:
                responses = await asyncio.gather(
                    *(client.post(f"{url}/generate", json=payload) for _ in range(4))
                )
            return [response.status_code for response in responses]

        assert asyncio.run(send()) == [200] * 4

    # Routed within milliseconds of each other, before any worker reports its load: two each.
    assert images_each_replica_made(serve_cluster.metrics_url, 32, burst) == [16.0, 16.0]


def test_a_request_that_finds_every_worker_busy_streams_before_they_finish(
    fault_app: tuple[str, Path],
) -> None:
    url, _ = fault_app
    # Eight batches each, one request on each of the two workers.
    busy = {"prompt": "busy", "nof_images": 32, "width": 256, "height": 256, "stream": True}
    late = {"prompt": "late", "nof_images": 2, "width": 256, "height": 256, "stream": True}
    arrivals: list[str] = []
    first_image = {name: asyncio.Event() for name in ("a", "b")}

    async def stream(client: httpx.AsyncClient, name: str, payload: dict[str, object]) -> None:
        async with client.stream("POST", f"{url}/generate", json=payload) as response:
            assert response.status_code == 200
            async for event in aread_events(response.aiter_lines()):
                if event.event == "image":
                    arrivals.append(name)
                    if name in first_image:
                        first_image[name].set()

    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=180) as client:
            running = [asyncio.create_task(stream(client, name, busy)) for name in ("a", "b")]
            for event in first_image.values():
                await event.wait()
            await asyncio.gather(*running, stream(client, "late", late))

    asyncio.run(scenario())
    assert arrivals.count("late") == 2
    # The late request took turns on a busy worker instead of waiting for a whole request.
    last = {name: len(arrivals) - 1 - arrivals[::-1].index(name) for name in ("a", "b")}
    assert arrivals.index("late") < min(last.values()), arrivals


def kill_a_replica(deployment: str, application: str = "faults") -> str:
    """Kill one replica of ``deployment`` for good; its name."""
    import ray

    names = sorted(
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if f"{application}#{deployment}#" in actor["name"]
    )
    assert names, f"no {deployment} replica found"
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    return names[0]


@pytest.mark.parametrize("deployment", ["FluxWorker", "Scorer"])
def test_a_replica_killed_mid_request_loses_no_image(
    fault_app: tuple[str, Path], deployment: str
) -> None:
    url, storage = fault_app
    loses_no_image_when(lambda: kill_a_replica(deployment), url, storage, timeout_s=180)


async def load(url: str, requests: int, concurrency: int) -> tuple[Counter[int], list[float]]:
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(requests):
        queue.put_nowait(index)
    payload = {"prompt": "load", "nof_images": 1, "width": 64, "height": 64}

    async with httpx.AsyncClient(timeout=120) as client:

        async def user() -> None:
            while not queue.empty():
                queue.get_nowait()
                started = time.perf_counter()
                response = await client.post(f"{url}/generate", json=payload)
                latencies.append(time.perf_counter() - started)
                statuses[response.status_code] += 1

        await asyncio.gather(*(user() for _ in range(concurrency)))
    return statuses, latencies


def test_bounded_load_has_no_errors_and_memory_levels_off(serve_cluster: ServeCluster) -> None:
    warm_statuses, _ = asyncio.run(load(serve_cluster.url, 40, 8))
    snapshots = [memory_by_process()]
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    started = time.perf_counter()
    for _ in range(2):
        round_statuses, round_latencies = asyncio.run(load(serve_cluster.url, 100, 8))
        statuses.update(round_statuses)
        latencies.extend(round_latencies)
        snapshots.append(memory_by_process())
    elapsed = time.perf_counter() - started
    quantiles = statistics.quantiles(latencies, n=100)
    first_round = growth(snapshots[0], snapshots[0], snapshots[1])
    second_round = growth(snapshots[0], snapshots[1], snapshots[2])
    print(
        f"\nload: 200 requests at concurrency 8 in {elapsed:.1f} s ({200 / elapsed:.1f} req/s); "
        f"statuses {dict(statuses)}; latency p50 {quantiles[49] * 1000:.0f} ms, "
        f"p95 {quantiles[94] * 1000:.0f} ms; Ray processes "
        f"{sum(snapshots[0].values()) / 2**20:.0f} MiB at start, growth "
        f"{first_round / 2**20:+.0f} MiB then {second_round / 2**20:+.0f} MiB per 100 requests"
    )
    # Only success or the documented overload answer.
    assert set(statuses) | set(warm_statuses) <= {200, 503}
    assert statuses[200] >= 190
    # Memory levels off: the second hundred requests add little to what the first added.
    assert second_round < 100 * 2**20
