"""The request flow: plan jobs, fan them out to workers, score, keep the best, store, report.

Plain asyncio over two callables, so the same flow runs on Ray Serve handles in production and on
in-process models in the fast tests.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from serve_app.faults import WorkerLost
from serve_app.generation.pipeline import RenderedImage
from serve_app.generation.planning import SamplingJob, plan_jobs, shard
from serve_app.schemas import GeneratedImage, GenerateRequest, GenerateResponse
from serve_app.settings import ServiceSettings
from serve_app.storage.base import ImageStore, StorageError, image_key
from serve_app.storage.codec import content_type
from serve_app.telemetry import NoTelemetry, Telemetry

logger = logging.getLogger(__name__)

RenderStream = Callable[[list[SamplingJob]], AsyncIterator[list[RenderedImage]]]
"""Makes the images of some jobs, yielding each batch as soon as it is done."""

ScoreImages = Callable[[str, list[bytes]], Awaitable[list[float]]]
"""Scores encoded images for a prompt."""

Progress = Callable[[list[RenderedImage]], None]
"""Told of each batch of a request's images as it comes back from a worker."""


def _no_progress(_: list[RenderedImage]) -> None:
    pass


@dataclass(frozen=True)
class Destination:
    """Where a request's images go: under its id, with a nonce of its own (fresh for every
    request; fixed for a job, so that a second run of it writes the same keys)."""

    request_id: str
    attempt: str
    base_url: str


@dataclass(frozen=True)
class _Scored:
    rendered: RenderedImage
    score: float


class GenerationService:
    """Turns a validated request into stored, scored images."""

    def __init__(
        self,
        settings: ServiceSettings,
        render: RenderStream,
        score: ScoreImages,
        store: ImageStore,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        self._render = render
        self._score = score
        self.store = store
        self.telemetry = telemetry or NoTelemetry()

    async def images(
        self,
        request: GenerateRequest,
        request_id: str,
        base_url: str,
        progress: Progress = _no_progress,
    ) -> AsyncIterator[GeneratedImage]:
        """Yield each image as soon as it is stored; with top_k, only the K best, best first.
        ``progress`` hears of each batch as soon as a worker has made it."""
        destination = Destination(request_id, uuid.uuid4().hex[:12], base_url)
        async for image in self.make_images(
            plan_jobs(request, self.settings), request, destination, progress
        ):
            yield image

    async def make_images(
        self,
        jobs: list[SamplingJob],
        request: GenerateRequest,
        destination: Destination,
        progress: Progress = _no_progress,
    ) -> AsyncIterator[GeneratedImage]:
        """Make, score and store the images of ``jobs`` (some or all of ``request``'s plan),
        yielding each as soon as it is stored; with top_k, only the K best, best first."""
        if request.top_k is None:
            async for batch in self._rendered(jobs, request.gpus, progress):
                scored = await self._scored(request.prompt, batch)
                for image in await self._store_all(scored, destination):
                    yield image
            return
        # Rank first, so that only the K images returned are ever stored.
        ranked: list[_Scored] = []
        async for batch in self._rendered(jobs, request.gpus, progress):
            ranked.extend(await self._scored(request.prompt, batch))
        ranked.sort(key=lambda item: (-item.score, item.rendered.job.index))
        for image in await self._store_all(ranked[: request.top_k], destination):
            yield image

    async def generate(
        self,
        request: GenerateRequest,
        request_id: str,
        base_url: str,
        started: float,
        progress: Progress = _no_progress,
    ) -> GenerateResponse:
        """The whole response: in job order, or best first with top_k."""
        images = [image async for image in self.images(request, request_id, base_url, progress)]
        if request.top_k is None:
            images.sort(key=lambda image: image.index)
        return build_response(request, request_id, images, started)

    async def _rendered(
        self, jobs: list[SamplingJob], gpus: int, progress: Progress
    ) -> AsyncIterator[list[RenderedImage]]:
        """Batches from up to ``gpus`` concurrent render streams, in order of completion."""
        queue: asyncio.Queue[list[RenderedImage] | BaseException | None] = asyncio.Queue()

        async def pump(part: list[SamplingJob]) -> None:
            remaining = part
            for attempt in itertools.count():
                try:
                    async for batch in self._render(remaining):
                        done = {rendered.job.index for rendered in batch}
                        remaining = [job for job in remaining if job.index not in done]
                        await queue.put(batch)
                except WorkerLost as error:
                    if attempt >= self.settings.max_retries:
                        await queue.put(error)
                        return
                    # Only the jobs not yet returned go again, to whichever replica is alive.
                    logger.warning(
                        "worker lost with %d jobs left, retrying: %s", len(remaining), error
                    )
                    await asyncio.sleep(self.settings.retry_backoff_s * 2**attempt)
                except Exception as error:  # noqa: BLE001 - re-raised by the consumer below
                    await queue.put(error)
                    return
                else:
                    await queue.put(None)
                    return

        shards = shard(jobs, gpus)
        tasks = [asyncio.create_task(pump(part)) for part in shards]
        outstanding = len(jobs)
        self.telemetry.jobs_in_flight(outstanding)
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    outstanding -= len(item)
                    self.telemetry.jobs_in_flight(-len(item))
                    progress(item)
                    yield item
        finally:
            self.telemetry.jobs_in_flight(-outstanding)
            for task in tasks:
                task.cancel()
            # Wait for the cancellations to land, so no work outlives its request.
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _scored(self, prompt: str, batch: list[RenderedImage]) -> list[_Scored]:
        started = time.perf_counter()
        images = [rendered.data for rendered in batch]
        for attempt in itertools.count():
            try:
                scores = await self._score(prompt, images)
                break
            except WorkerLost as error:
                if attempt >= self.settings.max_retries:
                    raise
                logger.warning("scorer lost, retrying: %s", error)
                await asyncio.sleep(self.settings.retry_backoff_s * 2**attempt)
        self.telemetry.stage_seconds("scoring", time.perf_counter() - started)
        return [_Scored(rendered, score) for rendered, score in zip(batch, scores, strict=True)]

    async def _store_all(
        self, items: list[_Scored], destination: Destination
    ) -> list[GeneratedImage]:
        """Store concurrently, off the event loop; fail if any image could not be stored."""
        results = await asyncio.gather(
            *(self._store(item, destination) for item in items), return_exceptions=True
        )
        failures = [
            (item, result)
            for item, result in zip(items, results, strict=True)
            if isinstance(result, BaseException)
        ]
        for item, failure in failures:
            logger.error(
                "image %d of request %s was not stored: %s",
                item.rendered.job.index,
                destination.request_id,
                failure,
            )
        if failures:
            raise StorageError(
                f"{len(failures)} of {len(items)} images could not be stored: {failures[0][1]}"
            )
        return [result for result in results if isinstance(result, GeneratedImage)]

    async def _store(self, item: _Scored, destination: Destination) -> GeneratedImage:
        job = item.rendered.job
        extension = job.image_format
        key = image_key(destination.request_id, destination.attempt, job.index, extension)
        started = time.perf_counter()
        await asyncio.to_thread(self.store.put, key, item.rendered.data, content_type(extension))
        self.telemetry.stage_seconds("upload", time.perf_counter() - started)
        return GeneratedImage(
            url=self.store.url(key, destination.base_url),
            index=job.index,
            sampling_params=job.params,
            score=item.score,
        )


def build_response(
    request: GenerateRequest, request_id: str, images: list[GeneratedImage], started: float
) -> GenerateResponse:
    """The response for ``images``, timed from ``started`` (a ``time.perf_counter()`` value)."""
    return GenerateResponse(
        request_id=request_id,
        prompt=request.prompt,
        count=len(images),
        images=images,
        latency_ms=round((time.perf_counter() - started) * 1000),
    )
