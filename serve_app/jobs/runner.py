"""Runs one job: claims it, makes the images its earlier runs did not store, ends it, announces it.

A job may be delivered more than once (Celery redelivers the task of a runner that died, and a
stopped runner hands its job back), so every run is idempotent: the store's lease lets one runner
at a time work on a job, images already stored are skipped (their keys are fixed per job and
index), and a job that has ended is only announced, never run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Literal, Protocol

from serve_app.api.errors import envelope_for
from serve_app.jobs.schemas import FINAL_STATUSES
from serve_app.jobs.store import JobRecord, JobStore
from serve_app.jobs.webhooks import WebhookDelivery
from serve_app.schemas import ErrorBody, GeneratedImage, GenerateRequest, GenerateResponse
from serve_app.service import Destination, GenerationService
from serve_app.settings import ServiceSettings
from serve_app.telemetry import NoTelemetry, Telemetry

logger = logging.getLogger(__name__)

RunOutcome = Literal["done", "handed_back"]
"""done: nothing more to do with this delivery; handed_back: requeue it (the run was stopped and
the job could not be queued again here)."""


class JobQueue(Protocol):
    """What jobs need of the queue (Celery, through deployments/job_queue.py). Blocking."""

    def submit(self, job_id: str, delay_s: float = 0) -> None:
        """Queue a run of the job, at once or after ``delay_s``."""

    def send_webhook(self, delivery: WebhookDelivery) -> None:
        """Queue a webhook delivery."""


class _Stopped(Exception):
    """The run stopped before its end: cancelled, handed back, or the job is another's now."""

    def __init__(self, why: Literal["cancelled", "handed_back", "taken_over"]) -> None:
        super().__init__(why)
        self.why = why


@dataclass(frozen=True)
class JobEnds:
    """Announces ended jobs to their webhooks, once each."""

    store: JobStore
    queue: JobQueue

    async def announce(self, job_id: str) -> None:
        """Queue the webhook of an ended job, unless it went out already or there is none."""
        record = await self.store.record(job_id)
        if record is None or record.webhook is None or record.notified:
            return
        job = await self.store.job(job_id)
        if job is None or not job.finished:
            return
        delivery = WebhookDelivery.for_job(job, record.webhook)
        await asyncio.to_thread(self.queue.send_webhook, delivery)
        # After the queue has it: at worst a crash here sends it twice, under one webhook-id.
        await self.store.mark_notified(job_id)


class JobRunner:
    """Runs jobs on a GenerationService; ``hand_back`` stops every run for another runner."""

    def __init__(
        self,
        settings: ServiceSettings,
        store: JobStore,
        service: GenerationService,
        queue: JobQueue,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.service = service
        self.queue = queue
        self.ends = JobEnds(store, queue)
        self.telemetry = telemetry or NoTelemetry()
        self._handing_back = threading.Event()
        # Often enough to renew the lease well before it lapses and to see a cancellation soon.
        self._tick_s = min(1.0, settings.jobs_lease_s / 5)

    def hand_back(self) -> None:
        """Stop every run at its next tick and queue its job again for another runner (the
        replica is stopping); deliveries that come after this are queued again untouched.
        Safe to call from any thread."""
        self._handing_back.set()

    async def run(self, job_id: str) -> RunOutcome:
        """One delivery of the job's task. Raises when the run failed and another may succeed
        (the queue retries it with backoff); the last allowed run fails the job instead."""
        if self._handing_back.is_set():
            return await self._requeue(job_id)
        settings = self.settings
        token = uuid.uuid4().hex
        claim = await self.store.claim(
            job_id,
            token,
            lease_s=settings.jobs_lease_s,
            now=time.time(),
            max_attempts=settings.jobs_max_attempts,
        )
        if claim.outcome == "missing":
            logger.warning("job %s: no such job (expired?), dropping its task", job_id)
            return "done"
        if claim.outcome == "final":
            await self.ends.announce(job_id)
            return "done"
        if claim.outcome == "leased":
            await self._stand_by(job_id)
            return "done"
        if claim.outcome == "exhausted":
            message = f"the job's runs stopped without an end {claim.detail} times; it was given up"
            await self._fail(job_id, "", ErrorBody(type="job_failed", message=message))
            return "done"
        record = claim.record
        assert record is not None  # a claim comes with the job
        attempt = int(claim.detail)
        if claim.first:
            self.telemetry.job_started(time.time() - record.created_at)
        try:
            await self._run_claimed(record, token)
        except _Stopped as stopped:
            if stopped.why == "cancelled":
                await self.store.finish(job_id, token, time.time())
                self.telemetry.job_finished("cancelled")
                await self.ends.announce(job_id)
            elif stopped.why == "handed_back":
                await self.store.release(job_id, token, handed_back=True)
                return await self._requeue(job_id)
            else:
                await self._stand_by(job_id)
            return "done"
        except Exception as error:
            if attempt < settings.jobs_max_attempts:
                logger.warning("job %s: run %d failed, to be retried: %s", job_id, attempt, error)
                with contextlib.suppress(Exception):
                    await self.store.release(job_id, token)
                raise
            _, envelope = envelope_for(error)
            await self._fail(job_id, token, envelope.error)
        return "done"

    async def _requeue(self, job_id: str) -> RunOutcome:
        """Queue the job again through this replica's own producer, so that it does not depend
        on the stopping Celery consumer (whose requeue is lost when the delivery's unacked entry
        is gone, and otherwise waits out the redelivery timeout when its connection closes)."""
        try:
            await asyncio.to_thread(self.queue.submit, job_id)
        except Exception as error:  # noqa: BLE001 - the consumer's own requeue is the fallback
            logger.warning("job %s: not queued again (%s), requeueing the delivery", job_id, error)
            return "handed_back"
        return "done"

    async def _stand_by(self, job_id: str) -> None:
        """Another runner holds the job. Celery gave this task again, so the delivery that runner
        holds may no longer be in Redis's unacked set (a redelivered copy shares its delivery
        tag): keep one delayed copy waiting, which takes over if that runner dies."""
        await asyncio.to_thread(self.queue.submit, job_id, self.settings.jobs_lease_s)

    async def _fail(self, job_id: str, token: str, error: ErrorBody) -> None:
        if await self.store.finish(job_id, token, time.time(), error=error):
            self.telemetry.job_finished("failed")
        await self.ends.announce(job_id)

    async def _run_claimed(self, record: JobRecord, token: str) -> None:
        request = record.request.generation()
        generation = asyncio.create_task(self._make_images(record, request))
        watch = asyncio.create_task(self._watch(record.job_id, token))
        try:
            done, _ = await asyncio.wait({generation, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (generation, watch):
                task.cancel()
            # Closing the render streams stops the workers' pipelines at their next step.
            await asyncio.gather(generation, watch, return_exceptions=True)
        if watch in done:
            watch.result()  # raises _Stopped
        images = generation.result()
        response = GenerateResponse(
            request_id=record.job_id,
            prompt=request.prompt,
            count=len(images),
            images=images,
            latency_ms=round((time.time() - record.created_at) * 1000),
        )
        if await self.store.finish(record.job_id, token, time.time(), result=response):
            self.telemetry.job_finished("succeeded")
        else:
            current = await self.store.record(record.job_id)
            status = current.status if current is not None else None
            if status is not None and status not in FINAL_STATUSES:
                raise _Stopped("taken_over")
            if status == "cancelled":  # while its last images were stored: this run's end
                await self.store.finish(record.job_id, token, time.time())
                self.telemetry.job_finished("cancelled")
            # Otherwise another runner that took it over ended it, and counted that.
        await self.ends.announce(record.job_id)

    async def _make_images(
        self, record: JobRecord, request: GenerateRequest
    ) -> list[GeneratedImage]:
        """The job's images: those earlier runs stored, and the rest, made now."""
        # Read again on every run: a job stores its request, not the fitted pixels.
        inputs = await self.service.read_inputs(request)
        plan, stored = await self.store.plan(
            record.job_id, await self.service.plan(request, inputs)
        )
        if request.top_k is not None:
            # Ranked images are stored only at the end: unless all K were, rank them all again.
            remaining = plan if len(stored) < request.top_k else []
        else:
            remaining = [job for job in plan if job.index not in stored]
        destination = Destination(record.job_id, record.attempt, record.base_url)
        made: list[GeneratedImage] = []
        cancelled = False

        async def record_image(image: GeneratedImage) -> None:
            nonlocal cancelled
            cancelled |= await self.store.add_image(record.job_id, image) == "cancelled"
            made.append(image)

        if remaining:
            images = self.service.make_images(remaining, request, destination, inputs, record_image)
            async for _ in images:
                # A batch's images are all recorded before the first is yielded: stopping here
                # keeps every image stored, and stops the next batch long before the next tick.
                if cancelled:
                    raise _Stopped("cancelled")
        if request.top_k is not None:
            best = made or list(stored.values())
            return sorted(best, key=lambda image: (-(image.score or 0.0), image.index))
        return sorted([*stored.values(), *made], key=lambda image: image.index)

    async def _watch(self, job_id: str, token: str) -> None:
        """Renew the lease while the job runs; raise _Stopped when it must stop."""
        while True:
            await asyncio.sleep(self._tick_s)
            if self._handing_back.is_set():
                raise _Stopped("handed_back")
            status = await self.store.renew(job_id, token, self.settings.jobs_lease_s)
            if status == "cancelled":
                raise _Stopped("cancelled")
            if status is None or status in FINAL_STATUSES:
                logger.warning("job %s: another runner took it over", job_id)
                raise _Stopped("taken_over")
