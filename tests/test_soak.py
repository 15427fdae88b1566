"""A bounded soak of the real Ray Serve instance: mixed requests for a while, no error beyond the
documented overload answer, memory levelling off.

About a minute by default (CI); ``FLUX_SOAK_S=600 scripts/test.sh tests/test_soak.py -s`` soaks
for ten minutes and prints the same figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import statistics
import time
from collections import Counter
from typing import Any

import httpx
import psutil
import pytest

from .conftest import ServeCluster
from .metrics import growth, memory_by_process
from .sse import parse_events

pytestmark = pytest.mark.ray

SOAK_S = float(os.environ.get("FLUX_SOAK_S", "60"))
CLIENTS = 4

# What users send, from one image at the smallest size to a streamed, ranked, two-GPU batch.
MIX: list[dict[str, Any]] = [
    {"nof_images": 1, "width": 64, "height": 64},
    {"nof_images": 4, "width": 128, "height": 128},
    {"nof_images": 8, "gpus": 2, "width": 128, "height": 128, "stream": True},
    {"nof_images": 6, "top_k": 2, "width": 128, "height": 128},
    {"nof_images": 4, "width": 64, "height": 64, "diversity": {"samplers": ["heun", "unipc"]}},
    {"nof_images": 2, "width": 128, "height": 128, "diversity": {"cfg_scales": [3.0]}},
    {"nof_images": 16},
]


def images_in(response: httpx.Response, payload: dict[str, Any]) -> int:
    """The images of a successful answer, streamed or not."""
    if payload.get("stream"):
        events = parse_events(response.text.splitlines())
        assert events[-1][0] == "result", events[-1]
        return int(events[-1][1]["count"])
    return int(response.json()["count"])


async def soak(url: str, seconds: float, snapshots: list[dict[int, int]]) -> list[Any]:
    """Clients sending requests from MIX for ``seconds``, in thirds; a memory snapshot after each.

    First every client sends the whole MIX once, in its own order, and the first snapshot comes
    after that: each worker has then made every kind of batch once, so what it keeps for them
    (caches of kernels, embeddings, adapters) is warm-up, not growth. The clients finish what they
    sent before each snapshot, so that it measures what the service keeps once idle, not the
    tensors of a batch in flight (a 16-image batch alone is a few hundred MiB), which an idle
    worker gives back to the host (serve_app/generation/host_memory.py).
    """
    outcomes: list[tuple[int, float, str | None]] = []
    chooser = random.Random(13)

    async def send(http: httpx.AsyncClient, choice: dict[str, Any]) -> None:
        payload = {"prompt": "soak", **choice}
        started = time.perf_counter()
        response = await http.post(f"{url}/generate", json=payload)
        kind = None
        if response.status_code == 200:
            expected = payload.get("top_k") or payload["nof_images"]
            assert images_in(response, payload) == expected
        else:
            kind = response.json()["error"]["type"]
        outcomes.append((response.status_code, time.perf_counter() - started, kind))

    async def warm_up(http: httpx.AsyncClient) -> None:
        for choice in chooser.sample(MIX, len(MIX)):
            await send(http, choice)

    async def user(http: httpx.AsyncClient, until: float) -> None:
        while time.monotonic() < until:
            await send(http, chooser.choice(MIX))

    async def snapshot() -> None:
        await asyncio.sleep(2)  # an idle worker's trim runs a second after its last images go out
        snapshots.append(memory_by_process())

    async with httpx.AsyncClient(timeout=300) as http:
        await asyncio.gather(*(warm_up(http) for _ in range(CLIENTS)))
        await snapshot()
        for _ in range(3):
            until = time.monotonic() + seconds / 3
            await asyncio.gather(*(user(http, until) for _ in range(CLIENTS)))
            await snapshot()
    return outcomes


def test_a_soak_of_mixed_requests_has_no_errors_and_memory_levels_off(
    serve_cluster: ServeCluster,
) -> None:
    snapshots: list[dict[int, int]] = []
    started = time.perf_counter()
    outcomes = asyncio.run(soak(serve_cluster.url, SOAK_S, snapshots))
    elapsed = time.perf_counter() - started
    statuses = Counter(status for status, _, _ in outcomes)
    latencies = sorted(seconds for status, seconds, _ in outcomes if status == 200)
    thirds = [growth(snapshots[0], snapshots[i], snapshots[i + 1]) for i in range(3)]
    quantiles = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    print(
        f"\nsoak: {len(outcomes)} mixed requests from {CLIENTS} clients in {elapsed:.0f} s "
        f"({len(outcomes) / elapsed:.2f} req/s); statuses {dict(statuses)}; latency p50 "
        f"{quantiles[9]:.2f} s, p95 {quantiles[18]:.2f} s; Ray processes "
        f"{sum(snapshots[0].values()) / 2**20:.0f} MiB after warm-up, growth per third "
        + ", ".join(f"{change / 2**20:+.0f} MiB" for change in thirds)
    )
    # Only success, or the documented overload answer.
    assert {kind for status, _, kind in outcomes if status != 200} <= {"overloaded"}
    assert statuses[200] >= 0.9 * len(outcomes)
    # Memory levels off: the last third adds little, whatever the first added.
    assert thirds[2] < 100 * 2**20, growers(snapshots[0], snapshots[2], snapshots[3])


def growers(settled: dict[int, int], before: dict[int, int], after: dict[int, int]) -> str:
    """The processes that grew most from ``before`` to ``after``, for the failure message."""
    common = settled.keys() & before.keys() & after.keys()
    grown = sorted(common, key=lambda pid: before[pid] - after[pid])[:5]
    return ", ".join(
        f"{process_name(pid)} {(after[pid] - before[pid]) / 2**20:+.0f} MiB" for pid in grown
    )


def process_name(pid: int) -> str:
    with contextlib.suppress(psutil.NoSuchProcess):
        return str(psutil.Process(pid).name())
    return str(pid)
