"""Times the service end to end over HTTP: streamed requests from concurrent clients."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from bench.cluster import RunningService
from bench.stats import median, percentile
from bench.workload import Workload
from serve_app.client.events import aread_events

# Benchmark requests on a slow machine can take minutes; a connect that hangs is a failure.
REQUEST_TIMEOUT = httpx.Timeout(1800.0, connect=10.0)
# Serve averages the load over 30 s (look_back_period_s), hears of it every 10 s and waits
# upscale_delay_s (5 s) more before it adds a replica.
_WARM_UP_S = 30.0
_SCALING_TIMEOUT_S = 600.0


class ServiceError(RuntimeError):
    """The service refused or failed a benchmark request."""


@dataclass(frozen=True)
class RequestTiming:
    """One streamed request: when its first image and its result arrived, from sending it."""

    first_image_s: float
    latency_s: float
    images: int


@dataclass(frozen=True)
class ServiceFigures:
    """The service at one concurrency: throughput (median of repeats) and pooled latencies."""

    concurrency: int
    images_per_s: float
    latency_p50_s: float
    latency_p95_s: float
    first_image_p50_s: float
    first_image_p95_s: float
    requests: int
    worker_replicas: tuple[int | None, int | None]
    """FluxWorker replicas running when the timed rounds started and when they ended."""


async def timed_request(client: httpx.AsyncClient, body: dict[str, Any]) -> RequestTiming:
    """Send one ``stream: true`` request and time its first ``image`` event and its ``result``."""
    started = time.perf_counter()
    first_image_s: float | None = None
    images = 0
    async with client.stream("POST", "/generate", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise ServiceError(f"POST /generate answered {response.status_code}: {response.text}")
        async for event in aread_events(response.aiter_lines()):
            if event.event == "image":
                images += 1
                if first_image_s is None:
                    first_image_s = time.perf_counter() - started
            elif event.event == "result":
                break
            elif event.event == "error":
                raise ServiceError(f"the stream failed: {event.data}")
        else:
            raise ServiceError("the stream ended without a result event")
    latency_s = time.perf_counter() - started
    if first_image_s is None or images != body["nof_images"]:
        raise ServiceError(f"expected {body['nof_images']} image events, got {images}")
    return RequestTiming(first_image_s=first_image_s, latency_s=latency_s, images=images)


async def load_round(
    client: httpx.AsyncClient, body: dict[str, Any], concurrency: int, requests_per_client: int
) -> tuple[float, list[RequestTiming]]:
    """``concurrency`` clients, each sending requests back to back: wall seconds and timings."""

    async def one_client() -> list[RequestTiming]:
        return [await timed_request(client, body) for _ in range(requests_per_client)]

    started = time.perf_counter()
    per_client = await asyncio.gather(*(one_client() for _ in range(concurrency)))
    wall_s = time.perf_counter() - started
    return wall_s, [timing for timings in per_client for timing in timings]


async def timed_rounds(
    url: str, body: dict[str, Any], concurrency: int, repeats: int, requests_per_client: int
) -> tuple[list[float], list[RequestTiming]]:
    """Images/s of each round, and the timings of all its requests."""
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT, trust_env=False) as client:
        rates: list[float] = []
        timings: list[RequestTiming] = []
        for _ in range(repeats):
            wall_s, round_timings = await load_round(client, body, concurrency, requests_per_client)
            rates.append(sum(timing.images for timing in round_timings) / wall_s)
            timings.extend(round_timings)
    return rates, timings


def warm_up(service: RunningService, body: dict[str, Any], concurrency: int) -> None:
    """Untimed rounds of one request per client until the autoscaler has settled on the load.

    The first round warms every path. Serve decides to add replicas only after some seconds of
    load, so the rounds go on for a while, and after any round that added replicas, so that the
    timed rounds measure the replicas this load keeps, not a scale-up midway (a worker keeps the
    calls it holds; only later calls reach a new one).
    """
    started = time.perf_counter()
    while True:
        before = service.worker_replicas()
        asyncio.run(timed_rounds(service.url, body, concurrency, 1, 1))
        service.wait_while_scaling(_SCALING_TIMEOUT_S)
        settled = service.worker_replicas() == before
        elapsed = time.perf_counter() - started
        if (settled and elapsed >= _WARM_UP_S) or elapsed >= _SCALING_TIMEOUT_S:
            return


def measure_service(
    service: RunningService,
    workload: Workload,
    concurrencies: Sequence[int],
    repeats: int,
    requests_per_client: int,
) -> list[ServiceFigures]:
    """Figures at each concurrency, in the order given.

    Untimed rounds come first (warm_up). Replicas are counted when the timed rounds start and end.
    """
    body = workload.request_body(stream=True)
    figures = []
    for concurrency in concurrencies:
        warm_up(service, body, concurrency)
        replicas_at_start = service.worker_replicas()
        rates, timings = asyncio.run(
            timed_rounds(service.url, body, concurrency, repeats, requests_per_client)
        )
        latencies = [timing.latency_s for timing in timings]
        first_images = [timing.first_image_s for timing in timings]
        figures.append(
            ServiceFigures(
                concurrency=concurrency,
                images_per_s=median(rates),
                latency_p50_s=percentile(latencies, 0.5),
                latency_p95_s=percentile(latencies, 0.95),
                first_image_p50_s=percentile(first_images, 0.5),
                first_image_p95_s=percentile(first_images, 0.95),
                requests=len(timings),
                worker_replicas=(replicas_at_start, service.worker_replicas()),
            )
        )
    return figures
