"""The render-call router's choices, driven directly: the real RenderCallRouter class, replicas
that stand in for FluxWorkers with the real adapter cache, no cluster."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve.request_router import PendingRequest, ReplicaID

from deployments.routing import ADAPTERS_STAT, RenderCallRouter
from serve_app.generation.adapter_cache import AdapterCache
from serve_app.generation.planning import SamplingJob
from serve_app.schemas import Lora, SamplingParams

DEPLOYMENT = DeploymentID(name="FluxWorker", app_name="routing-test")
DIGESTS = [f"sha256:{index:064x}" for index in range(4)]


@dataclass
class Worker:
    """What the router sees of a replica (its id, capacity and routing stats), and a real
    adapter cache that counts hits."""

    name: str
    cache_size: int
    replica_id: ReplicaID = field(init=False)
    max_ongoing_requests: int = 4
    routing_stats: dict[str, Any] = field(default_factory=dict)
    hits: int = 0
    cache: AdapterCache[str] = field(init=False)

    def __post_init__(self) -> None:
        self.replica_id = ReplicaID(unique_id=self.name, deployment_id=DEPLOYMENT)
        self.cache = AdapterCache(self.cache_size, 1 << 30, lambda _digest, _value: None)

    def run(self, digest: str) -> None:
        """Make a call's batch: a hit if its adapter is loaded, else load it."""
        if self.cache.get(digest) is not None:
            self.hits += 1
            return
        self.cache.make_room(1, keep=[digest])
        self.cache.add(digest, digest, 1)

    def report(self) -> None:
        """What FluxWorker.record_routing_stats tells the routers."""
        self.routing_stats = {ADAPTERS_STAT: self.cache.digests}


def render_call(number: int, digest: str) -> PendingRequest:
    params = SamplingParams(
        sampler="euler",
        steps=4,
        cfg_scale=1.0,
        seed=number,
        width=64,
        height=64,
        loras=(Lora(name=f"adapter-{digest[-1]}", digest=digest),),
    )
    jobs = [SamplingJob(index=0, prompt="a red cat", negative_prompt=None, params=params)]
    metadata = RequestMetadata(request_id=f"r{number}", internal_request_id=f"i{number}")
    return PendingRequest(args=[jobs], kwargs={}, metadata=metadata)


def router(adapter_affinity: bool) -> RenderCallRouter:
    chooser = RenderCallRouter(DEPLOYMENT, DeploymentHandleSource.UNKNOWN)
    chooser.initialize_state(adapter_affinity=adapter_affinity)
    return chooser


async def route(chooser: RenderCallRouter, workers: list[Worker], call: PendingRequest) -> Worker:
    ranked = await chooser.choose_replicas(workers, call)  # type: ignore[arg-type]
    chosen: Worker = ranked[0][0]  # type: ignore[assignment]
    chooser.on_request_routed(call, chosen.replica_id, None)  # type: ignore[arg-type]
    return chosen


def mixed_load_hits(adapter_affinity: bool) -> int:
    """Rounds of one to three concurrent calls, each with one of four adapters (some more
    popular), on three replicas that each keep one; the replicas report after every round."""
    import asyncio

    chooser = router(adapter_affinity)
    workers = [Worker(f"replica-{index}", cache_size=1) for index in range(3)]
    draw = random.Random(7)
    number = 0

    async def run() -> None:
        nonlocal number
        for _ in range(60):
            calls = []
            for _ in range(draw.randint(1, 3)):
                number += 1
                digest = draw.choices(DIGESTS, weights=[4, 3, 2, 1])[0]
                calls.append((await route(chooser, workers, render_call(number, digest)), digest))
            for worker, digest in calls:
                worker.run(digest)
            for call_number, (worker, _) in enumerate(calls, start=number - len(calls) + 1):
                chooser.on_request_completed(worker.replica_id, f"i{call_number}")
            for worker in workers:
                worker.report()

    asyncio.run(run())
    return sum(worker.hits for worker in workers)


def test_cache_hits_rise_under_a_mixed_load_with_adapter_affinity() -> None:
    plain = mixed_load_hits(adapter_affinity=False)
    preferring = mixed_load_hits(adapter_affinity=True)
    # 116 calls: 33 hits with plain least-busy routing, 50 with the preference.
    assert preferring >= 1.3 * plain, (preferring, plain)


@pytest.mark.parametrize("reported", [True, False], ids=["reported", "sent-lately"])
def test_among_equally_busy_replicas_the_one_holding_the_adapters_is_first(
    reported: bool,
) -> None:
    import asyncio

    chooser = router(adapter_affinity=True)
    workers = [Worker(name, cache_size=2) for name in ("a", "b", "c")]

    async def run() -> list[str]:
        if reported:
            workers[2].routing_stats = {ADAPTERS_STAT: [DIGESTS[1]]}
        else:  # the router sent it a call with that adapter, not yet reported
            chooser.on_request_routed(render_call(0, DIGESTS[1]), workers[2].replica_id, None)  # type: ignore[arg-type]
            chooser.on_request_completed(workers[2].replica_id, "i0")
        holder = await route(chooser, workers, render_call(1, DIGESTS[1]))
        # Busier now, the holder comes after the idle replicas; of those, neither holds the
        # adapter, and b, which holds none, loses the least by loading it.
        second = await route(chooser, workers, render_call(2, DIGESTS[1]))
        # The least busy first, whatever it holds.
        third = await route(chooser, workers, render_call(3, DIGESTS[1]))
        return [holder.name, second.name, third.name]

    workers[0].routing_stats = {ADAPTERS_STAT: [DIGESTS[0]]}
    assert asyncio.run(run()) == ["c", "b", "a"]
