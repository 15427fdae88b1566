"""Times LoRA adapters: switching between them on a warm worker, and the service's images/s with
one adapter for every request against a mix of four across concurrent requests.

A batch with an adapter the worker holds costs what any batch costs plus setting the active
adapters; one it has to load costs a read of the file besides. Requests with different adapters
never share a pipeline call, so a mix keeps its throughput only where each request fills batches
of its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.cluster import RunningService
from bench.service_timing import REQUEST_TIMEOUT, timed_request, warm_up
from bench.stats import median
from bench.workload import Workload
from serve_app.generation.pipeline import FluxGenerator
from serve_app.generation.planning import SamplingJob
from serve_app.models.tiny import TINY_FLUX_NAME, TINY_LORAS_NAME, build_once, ensure_tiny_model
from serve_app.models.tiny_loras import ATTENTION, CONTEXT, MLP, TINY_LORAS, LoraSpec, write_loras
from serve_app.schemas import Lora
from serve_app.settings import ServiceSettings

# Four adapters of the usual shape of FLUX LoRAs: rank 16 on attention and feed-forward layers.
BENCH_LORAS = tuple(
    LoraSpec(
        f"bench-{letter}", ATTENTION + CONTEXT + MLP, rank=16, alpha=16.0, strength=0.05, seed=seed
    )
    for seed, letter in enumerate("abcd", start=11)
)


def ensure_loras(model: Path, cache_dir: Path) -> tuple[Path, list[str]]:
    """An adapter library for ``model`` (the tiny model's own, or four built for it) and the
    names of its adapters."""
    if model.name == TINY_FLUX_NAME:
        return ensure_tiny_model(TINY_LORAS_NAME, cache_dir), [spec.name for spec in TINY_LORAS]

    def build(folder: Path) -> Path:
        from diffusers import FluxTransformer2DModel

        transformer = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer")
        return write_loras(transformer, folder, BENCH_LORAS)

    return build_once(cache_dir / f"{model.name}-loras-v1", build), [s.name for s in BENCH_LORAS]


def with_adapters(jobs: list[SamplingJob], loras: tuple[Lora, ...]) -> list[SamplingJob]:
    """``jobs`` applying ``loras``."""
    return [
        job.model_copy(update={"params": job.params.model_copy(update={"loras": loras})})
        for job in jobs
    ]


@dataclass(frozen=True)
class SwitchFigures:
    """Median seconds of one batch on a warm worker, by what its adapter needed first."""

    batch_size: int
    same_s: float
    """The adapter of the batch before: nothing to change."""
    switched_s: float
    """Another adapter the worker holds: a switch."""
    loaded_s: float
    """An adapter the worker had to load (its cache full of others): a miss."""

    @property
    def switch_s(self) -> float:
        """What switching between held adapters adds to a batch."""
        return max(0.0, self.switched_s - self.same_s)

    @property
    def load_s(self) -> float:
        """What loading an adapter adds to a batch."""
        return max(0.0, self.loaded_s - self.same_s)


def measure_switches(
    settings: ServiceSettings,
    workload: Workload,
    names: Sequence[str],
    batch_size: int,
    repeats: int,
) -> SwitchFigures:
    """Batches of ``batch_size`` on the service's own generator, holding two adapters at most:
    the same adapter again, two in turn (held, so a switch), three in turn (always a load)."""
    generator = FluxGenerator(
        settings.model_copy(update={"warmup": False, "max_loras": 1, "lora_cache_size": 2})
    )
    assert generator.adapters is not None, "the settings name no adapter library"
    library = generator.adapters.library  # type: ignore[attr-defined]
    jobs = workload.jobs(settings)[:batch_size]
    batches = [with_adapters(jobs, library.resolve([Lora(name=name)])) for name in names[:3]]

    def seconds(order: list[int]) -> list[float]:
        """Time each batch of ``order`` after the first (which sets the cache's state)."""
        times = []
        for position, number in enumerate(order):
            started = time.perf_counter()
            generator.sample(batches[number])
            if position:
                times.append(time.perf_counter() - started)
        return times

    seconds([0, 1, 2])  # lazy initialization and allocator growth, off the clock
    same: list[float] = []
    switched: list[float] = []
    loaded: list[float] = []
    for _ in range(repeats):  # in turn, so that load from elsewhere falls on all three alike
        same += seconds([0] * 4)
        switched += seconds([1, 0] * 2)
        loaded += seconds([0, 1, 2] * 2)
    return SwitchFigures(batch_size, median(same), median(switched), median(loaded))


@dataclass(frozen=True)
class MixFigures:
    """The service's images/s with one adapter for all requests and with a mix of adapters."""

    concurrency: int
    adapters: int
    one_images_per_s: float
    mix_images_per_s: float


BodyFor = Callable[[int, int], dict[str, Any]]
"""The body of a client's request: (client, request number) -> body."""


def bodies(workload: Workload, names: Sequence[str]) -> BodyFor:
    """Concurrent clients' requests, each with one adapter of ``names`` and never the same as
    the client beside it: at any moment, as many adapters in flight as clients (up to all)."""
    body = workload.request_body(stream=True)
    return lambda client, number: {
        **body,
        "loras": [{"name": names[(client + number) % len(names)]}],
    }


async def _round(
    client: httpx.AsyncClient, body_for: BodyFor, concurrency: int, requests_per_client: int
) -> float:
    """Images/s of ``concurrency`` clients sending requests back to back."""

    async def one_client(number: int) -> int:
        made = 0
        for request in range(requests_per_client):
            made += (await timed_request(client, body_for(number, request))).images
        return made

    started = time.perf_counter()
    images = await asyncio.gather(*(one_client(number) for number in range(concurrency)))
    return sum(images) / (time.perf_counter() - started)


def measure_mix(
    service: RunningService,
    workload: Workload,
    names: Sequence[str],
    concurrency: int,
    repeats: int,
    requests_per_client: int,
) -> MixFigures:
    """Median images/s over ``repeats`` rounds each of one adapter and of the mix, in turn."""
    one, mix = bodies(workload, names[:1]), bodies(workload, names)
    warm_up(service, one(0, 0), concurrency)

    async def run() -> tuple[list[float], list[float]]:
        async with httpx.AsyncClient(
            base_url=service.url, timeout=REQUEST_TIMEOUT, trust_env=False
        ) as client:
            await _round(client, mix, concurrency, 1)  # every worker loads every adapter once
            ones, mixes = [], []
            for _ in range(repeats):
                ones.append(await _round(client, one, concurrency, requests_per_client))
                mixes.append(await _round(client, mix, concurrency, requests_per_client))
            return ones, mixes

    ones, mixes = asyncio.run(run())
    return MixFigures(concurrency, len(names), median(ones), median(mixes))
