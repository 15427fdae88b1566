"""The request flow: plan jobs, fan them out to workers, score, keep the best, store, report.

Plain asyncio over two callables, so the same flow runs on Ray Serve handles in production and on
in-process models in the fast tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from serve_app.faults import WorkerLost
from serve_app.generation.adapter_library import AdapterLibrary
from serve_app.generation.pipeline import RenderedImage
from serve_app.generation.planning import SamplingJob, plan_jobs, shard
from serve_app.inputs.fitting import RequestInputs
from serve_app.inputs.pixels import RenderInputs
from serve_app.inputs.reading import read_inputs
from serve_app.schemas import GeneratedImage, GenerateRequest, GenerateResponse, Lora
from serve_app.settings import ServiceSettings
from serve_app.storage.base import ImageStore, StorageError, image_key
from serve_app.storage.codec import content_type
from serve_app.telemetry import NoTelemetry, Telemetry

logger = logging.getLogger(__name__)

RequestT = TypeVar("RequestT", bound=GenerateRequest)

RenderStream = Callable[[list[SamplingJob], RenderInputs], AsyncIterator[list[RenderedImage]]]
"""Makes the images of some jobs from the input images they name, yielding each batch as soon as
it is done."""

ScoreImages = Callable[[str, list[bytes]], Awaitable[list[float]]]
"""Scores encoded images for a prompt."""

OnStored = Callable[[GeneratedImage], Awaitable[None]]
"""Hears of each image once it is stored (a job records it)."""

Progress = Callable[[list[RenderedImage]], None]
"""Told of each batch of a request's images as it comes back from a worker (admission counts
the work done)."""


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
class ScoredImage:
    """A finished image and how well it matches its prompt, not yet stored."""

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
        library: AdapterLibrary | None = None,
    ) -> None:
        self.settings = settings
        self._render = render
        self._score = score
        self.store = store
        self.telemetry = telemetry or NoTelemetry()
        self.library = library or AdapterLibrary(settings)

    async def resolve_loras(self, request: GenerateRequest) -> tuple[Lora, ...]:
        """The request's adapters, checked against the library, with their files' digests;
        AdapterRefused naming the entry that can't be used."""
        if not request.loras:
            return ()
        return await asyncio.to_thread(self.library.resolve, request.loras)

    async def pin_loras(self, request: RequestT) -> RequestT:
        """``request`` with each adapter's digest set, so that its images use exactly the files
        checked now; AdapterRefused before any work starts."""
        if not request.loras:
            return request
        return request.model_copy(update={"loras": list(await self.resolve_loras(request))})

    async def read_inputs(self, request: GenerateRequest) -> RequestInputs | None:
        """The request's input image and mask, fetched, checked and fitted: once per request.

        Raises InputRefused (422) or InputFetchFailed (424); None for text-to-image.
        """
        return await read_inputs(request, self.settings)

    async def images(
        self,
        request: GenerateRequest,
        request_id: str,
        base_url: str,
        inputs: RequestInputs | None = None,
        progress: Progress = _no_progress,
    ) -> AsyncIterator[GeneratedImage]:
        """Yield each image as soon as it is stored; with top_k, only the K best, best first.

        ``inputs`` are the request's read inputs, where the caller has read them already;
        ``progress`` hears of each batch as soon as a worker has made it.
        """
        inputs = inputs or await self.read_inputs(request)
        destination = Destination(request_id, uuid.uuid4().hex[:12], base_url)
        async for image in self.make_images(
            await self.plan(request, inputs),
            request,
            destination,
            inputs,
            progress=progress,
        ):
            yield image

    async def plan(
        self, request: GenerateRequest, inputs: RequestInputs | None
    ) -> list[SamplingJob]:
        """The request's jobs from its read ``inputs``, applying its adapters as the library
        resolves them now."""
        loras = await self.resolve_loras(request)
        return plan_jobs(request, self.settings, inputs, loras)

    async def make_images(
        self,
        jobs: list[SamplingJob],
        request: GenerateRequest,
        destination: Destination,
        inputs: RequestInputs | None,
        on_stored: OnStored | None = None,
        progress: Progress = _no_progress,
    ) -> AsyncIterator[GeneratedImage]:
        """Make, score and store the images of ``jobs`` (some or all of ``request``'s plan, from
        its read ``inputs``), yielding each as soon as it is stored; with top_k, only the K
        best, best first. ``on_stored`` hears of every image stored, also of those a caller
        that stops in the middle of a batch is no longer given."""
        async for final in self.scored_images(jobs, request, inputs, progress):
            for image in await self._store_all(final, destination, on_stored):
                yield image

    async def scored_images(
        self,
        jobs: list[SamplingJob],
        request: GenerateRequest,
        inputs: RequestInputs | None = None,
        progress: Progress = _no_progress,
    ) -> AsyncIterator[list[ScoredImage]]:
        """Yield the images of ``jobs`` (from the request's read ``inputs``) that are final,
        unstored: each batch as soon as it is scored; with top_k, once all are scored, only the
        K best, best first."""
        carried = inputs.render_inputs() if inputs else RenderInputs()
        if request.top_k is None:
            async for batch in self._rendered(jobs, request.gpus, carried, progress):
                yield await self._scored(request.prompt, batch)
            return
        # Rank first, so that only the K images returned are ever stored.
        ranked: list[ScoredImage] = []
        async for batch in self._rendered(jobs, request.gpus, carried, progress):
            ranked.extend(await self._scored(request.prompt, batch))
        ranked.sort(key=lambda item: (-item.score, item.rendered.job.index))
        yield ranked[: request.top_k]

    async def generate(
        self,
        request: GenerateRequest,
        request_id: str,
        base_url: str,
        started: float,
        inputs: RequestInputs | None = None,
        progress: Progress = _no_progress,
    ) -> GenerateResponse:
        """The whole response: in job order, or best first with top_k."""
        images = [
            image async for image in self.images(request, request_id, base_url, inputs, progress)
        ]
        if request.top_k is None:
            images.sort(key=lambda image: image.index)
        return build_response(request, request_id, images, started)

    async def _rendered(
        self, jobs: list[SamplingJob], gpus: int, inputs: RenderInputs, progress: Progress
    ) -> AsyncIterator[list[RenderedImage]]:
        """Batches from up to ``gpus`` concurrent render streams, in order of completion; each
        call carries the input images once, for all its jobs."""
        queue: asyncio.Queue[list[RenderedImage] | BaseException | None] = asyncio.Queue()

        async def pump(part: list[SamplingJob]) -> None:
            remaining = part
            for attempt in itertools.count():
                try:
                    async for batch in self._render(remaining, inputs):
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

    async def _scored(self, prompt: str, batch: list[RenderedImage]) -> list[ScoredImage]:
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
        return [ScoredImage(rendered, score) for rendered, score in zip(batch, scores, strict=True)]

    async def _store_all(
        self, items: list[ScoredImage], destination: Destination, on_stored: OnStored | None
    ) -> list[GeneratedImage]:
        """Store concurrently, off the event loop, and tell ``on_stored`` of each image; fail if
        any could not be stored. Once begun it runs to its end, even when the caller is
        cancelled meanwhile: an upload can't be called back, and a stopped job must keep exactly
        the images it reports."""
        storing = asyncio.ensure_future(self._store_batch(items, destination, on_stored))
        try:
            return await asyncio.shield(storing)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):  # the caller stops either way
                await storing
            raise

    async def _store_batch(
        self, items: list[ScoredImage], destination: Destination, on_stored: OnStored | None
    ) -> list[GeneratedImage]:
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
        images = [result for result in results if isinstance(result, GeneratedImage)]
        if on_stored is not None:
            for image in images:
                await on_stored(image)
        return images

    async def _store(self, item: ScoredImage, destination: Destination) -> GeneratedImage:
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
