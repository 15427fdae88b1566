"""Shares one FluxGenerator among the render calls a worker holds at once.

A worker replica takes several render calls at a time (other requests, or other shards of one).
One loop makes their batches: each call leads a batch in turn, so a call that arrives while
another is running sees its first images after about one batch instead of after the whole other
call, and every batch is topped up with jobs of the other calls that can share its pipeline call
(prompts and seeds may differ; sampler, steps, guidance and size may not). Encoding a batch runs
beside the sampling of the next one. Once nothing is left in flight, the memory the batches freed
goes back to the host (serve_app/generation/host_memory.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from serve_app.generation.adapter_library import AdapterRefused
from serve_app.generation.host_memory import release_free_memory
from serve_app.generation.pipeline import RenderCancelled, RenderedImage
from serve_app.generation.planning import SamplingJob
from serve_app.inputs.pixels import RenderInputs
from serve_app.telemetry import NoTelemetry, Telemetry

logger = logging.getLogger(__name__)

_IDLE_S = 1.0
"""How long a worker must have had nothing to do before ``when_idle`` runs."""


class BatchRenderer(Protocol):
    """What the scheduler needs of a FluxGenerator."""

    def sample(
        self,
        batch: list[SamplingJob],
        cancelled: threading.Event | None = None,
        inputs: RenderInputs | None = None,
    ) -> list[Any]:
        """The images of a batch from the ``inputs`` its jobs name, not yet encoded;
        RenderCancelled once ``cancelled`` is set."""

    def encode(self, batch: list[SamplingJob], images: list[Any]) -> list[RenderedImage]:
        """The sampled images of a batch, encoded for storage."""


@dataclass(eq=False)
class _Call:
    """One render call: the jobs not yet in a batch, their input images, where the images go."""

    pending: list[SamplingJob]
    inputs: RenderInputs
    results: asyncio.Queue[list[RenderedImage] | BaseException] = field(
        default_factory=asyncio.Queue
    )
    gone: bool = False
    """The caller stopped listening: its images are no longer wanted."""


@dataclass(frozen=True)
class _Batch:
    """Jobs of one pipeline call, each with the call that wants its image."""

    members: list[tuple[_Call, SamplingJob]]
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def jobs(self) -> list[SamplingJob]:
        return [job for _, job in self.members]

    @property
    def inputs(self) -> RenderInputs:
        """The input images of every call in the batch (a batch may mix several requests')."""
        calls = dict.fromkeys(call for call, _ in self.members)
        return RenderInputs.merged(call.inputs for call in calls)


def round_robin(queues: list[list[SamplingJob]], limit: int) -> list[tuple[int, SamplingJob]]:
    """Up to ``limit`` jobs taken from ``queues`` in turn, each with the number of its queue.

    Taking in turn gives every call in a batch some of its images, rather than filling the batch
    with the leading call's and leaving the others for later.
    """
    taken: list[tuple[int, SamplingJob]] = []
    for position in range(max((len(queue) for queue in queues), default=0)):
        for number, queue in enumerate(queues):
            if len(taken) == limit:
                return taken
            if position < len(queue):
                taken.append((number, queue[position]))
    return taken


class RenderScheduler:
    """Makes the images of concurrent render calls on one generator, batch by batch."""

    def __init__(
        self,
        generator: BatchRenderer,
        *,
        max_batch_size: int,
        across_calls: bool,
        telemetry: Telemetry | None = None,
        worker: str = "local",
        when_idle: Callable[[], None] = release_free_memory,
    ) -> None:
        """``when_idle`` runs in a thread once the worker has had nothing in flight for a second."""
        self.generator = generator
        self._when_idle = when_idle
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idling: asyncio.Task[None] | None = None
        self._worker = worker
        self._max_batch_size = max_batch_size
        self._across_calls = across_calls
        self._telemetry = telemetry or NoTelemetry()
        # The first waiting call leads the next batch; the last lead goes to the back first, so
        # a call that arrived while it was leading comes before it.
        self._calls: deque[_Call] = deque()
        self._last_lead: _Call | None = None
        self._running: _Batch | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[None]] = set()

    async def render(
        self, jobs: list[SamplingJob], inputs: RenderInputs | None = None
    ) -> AsyncIterator[list[RenderedImage]]:
        """Yield the images of ``jobs`` (from the ``inputs`` they name) in groups, each as soon
        as its batch is made."""
        call = _Call(pending=list(jobs), inputs=inputs or RenderInputs())
        self._calls.append(call)
        # Started on demand and ended when idle, so it always runs on the current event loop.
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._make_batches())
        outstanding = len(jobs)
        try:
            while outstanding:
                result = await call.results.get()
                if isinstance(result, BaseException):
                    raise result
                outstanding -= len(result)
                yield result
        finally:
            self._leave(call)

    def _leave(self, call: _Call) -> None:
        """Forget a call that ended; a batch that only it wanted stops at its next step."""
        call.gone = True
        call.pending.clear()
        with contextlib.suppress(ValueError):
            self._calls.remove(call)
        running = self._running
        if running is not None and all(member.gone for member, _ in running.members):
            running.cancelled.set()

    def _next_batch(self) -> _Batch | None:
        """The front call's next jobs, topped up with other calls' jobs of the same batch key."""
        last = self._last_lead
        if last is not None and last in self._calls:
            self._calls.remove(last)
            self._calls.append(last)
        waiting = [call for call in self._calls if call.pending]
        if not waiting:
            return None
        lead = self._last_lead = waiting[0]
        key = lead.pending[0].batch_key()
        sharers = waiting if self._across_calls else [lead]
        queues = [[job for job in call.pending if job.batch_key() == key] for call in sharers]
        members = [
            (sharers[number], job) for number, job in round_robin(queues, self._max_batch_size)
        ]
        for call, job in members:
            call.pending.remove(job)
        return _Batch(members)

    async def _make_batches(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._running = batch
            started = time.perf_counter()
            try:
                # The pipeline blocks for the whole batch: keep it off the event loop.
                images = await asyncio.to_thread(
                    self.generator.sample, batch.jobs, batch.cancelled, batch.inputs
                )
            except asyncio.CancelledError:
                batch.cancelled.set()  # the event loop is going away: free the pipeline too
                raise
            except RenderCancelled:
                continue
            except AdapterRefused as error:
                # The client's error, and only the calls that asked for the adapter wanted it.
                logger.warning("adapters refused: %s", error)
                self._hand_out(batch, error)
                continue
            except Exception as error:
                logger.exception("a batch of %d images failed", len(batch.members))
                self._hand_out(batch, error)
                continue
            finally:
                self._running = None
            seconds = time.perf_counter() - started
            self._telemetry.stage_seconds("generation", seconds)
            self._telemetry.images_generated(batch.jobs[0].params.sampler, len(batch.members))
            delivery = asyncio.create_task(self._deliver(batch, images, seconds))
            self._deliveries.add(delivery)  # the loop keeps only weak references to tasks
            delivery.add_done_callback(self._delivered)

    def _delivered(self, delivery: asyncio.Task[None]) -> None:
        self._deliveries.discard(delivery)
        if self._idle():
            # Only once the worker stays idle: a client sending one request after another leaves
            # it idle for a moment between them, and its next batch would fault the pages in again.
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            self._idle_timer = asyncio.get_running_loop().call_later(_IDLE_S, self._still_idle)

    def _idle(self) -> bool:
        """Nothing sampling, encoding or waiting for a batch."""
        running = self._running is not None or self._deliveries
        return not running and not any(call.pending for call in self._calls)

    def _still_idle(self) -> None:
        if self._idle() and (self._idling is None or self._idling.done()):
            self._idling = asyncio.create_task(asyncio.to_thread(self._when_idle))

    async def _deliver(self, batch: _Batch, images: list[Any], seconds: float) -> None:
        """Encode a batch off the event loop while the next one samples, then hand it out, each
        image with its share of the batch's time (its jobs cost the same: they share a key)."""
        by_call: dict[_Call, list[RenderedImage]] = {}
        made = {"compute_s": seconds / len(batch.members), "worker": self._worker}
        try:
            rendered = await asyncio.to_thread(self.generator.encode, batch.jobs, images)
            for (call, _), image in zip(batch.members, rendered, strict=True):
                by_call.setdefault(call, []).append(image.model_copy(update=made))
        except Exception as error:  # noqa: BLE001 - handed to the calls that wanted the batch
            self._hand_out(batch, error)
            return
        for call, its_images in by_call.items():
            if not call.gone:
                call.results.put_nowait(its_images)

    @staticmethod
    def _hand_out(batch: _Batch, error: BaseException) -> None:
        """Fail every call that wanted an image of ``batch``."""
        for call in dict.fromkeys(call for call, _ in batch.members):
            if not call.gone:
                call.results.put_nowait(error)
