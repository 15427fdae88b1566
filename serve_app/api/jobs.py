"""The ``/jobs`` routes: submit a job, read it, cancel it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Request
from fastapi.responses import JSONResponse

from serve_app.api.auth import key_owner
from serve_app.api.outbound import OutboundURLRefused, check_outbound_url
from serve_app.faults import InvalidParameter
from serve_app.inputs.reading import read_inputs
from serve_app.jobs.runner import JobEnds, JobQueue
from serve_app.jobs.schemas import FINAL_STATUSES, Job, JobRequest
from serve_app.jobs.store import JobFinished, JobNotFound, JobStore, JobStoreUnavailable
from serve_app.jobs.webhooks import WEBHOOK_SCHEMES
from serve_app.schemas import ErrorEnvelope
from serve_app.settings import ServiceSettings
from serve_app.telemetry import Telemetry

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")

JobId = Annotated[str, Path(description="The job's id, as POST /jobs answered it.")]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=255,
        description="Repeating a submission with the same key and body answers the same job; "
        "the same key with another body is a 409.",
    ),
]


@dataclass(frozen=True)
class JobBackend:
    """What the routes work on: the job records and the queue."""

    store: JobStore
    queue: JobQueue


def _fingerprint(body: JobRequest) -> str:
    """The body as the service reads it, defaults included: equal requests, equal prints."""
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _missing(job_id: str) -> JobNotFound:
    return JobNotFound(f"no job {job_id!r}")


def jobs_router(
    backend: JobBackend,
    settings: ServiceSettings,
    telemetry: Telemetry,
    responses: dict[int | str, dict[str, Any]],
    pin_loras: Callable[[JobRequest], Awaitable[JobRequest]],
) -> APIRouter:
    """The routes of ``/jobs``; ``responses`` documents the errors they share with /generate;
    ``pin_loras`` checks a job's adapters and pins their digests when it is submitted."""
    router = APIRouter(prefix="/jobs", tags=["jobs"])
    # A default, not an Annotated alias: a local alias would be a forward reference FastAPI
    # can't resolve.
    owner_of_key = Depends(key_owner(settings.api_keys))
    store, ends = backend.store, JobEnds(backend.store, backend.queue)
    not_found: dict[int | str, dict[str, Any]] = {
        404: {"model": ErrorEnvelope, "description": "No such job (of this API key)."}
    }
    conflict: dict[int | str, dict[str, Any]] = {
        409: {"model": ErrorEnvelope, "description": "The job has ended already."}
    }

    async def check_webhook(url: str) -> None:
        if settings.webhook_secret is None:
            raise InvalidParameter(
                "webhook", "webhooks are off here: the service has no FLUX_SERVE_WEBHOOK_SECRET"
            )
        try:
            await asyncio.to_thread(
                check_outbound_url,
                url,
                schemes=WEBHOOK_SCHEMES,
                allowed_hosts=settings.webhook_allowed_hosts,
            )
        except OutboundURLRefused as error:
            raise InvalidParameter("webhook", str(error)) from error

    @router.post(
        "",
        status_code=202,
        response_model=Job,
        responses={
            **responses,
            409: {"model": ErrorEnvelope, "description": "Idempotency-Key used with another body."},
            503: {
                "model": ErrorEnvelope,
                "description": "The job broker (Redis) can't be reached; /generate still works.",
            },
        },
    )
    async def submit(
        body: JobRequest,
        request: Request,
        idempotency_key: IdempotencyKey = None,
        owner: str = owner_of_key,
    ) -> JSONResponse:
        """Queue a generation; the answer comes at once, the images later."""
        if body.webhook is not None:
            await check_webhook(body.webhook)
        # A bad or unreachable input is a 4xx now, not a failed job later; the job reads it
        # again when it runs (it keeps the request, not the pixels).
        await read_inputs(body, settings)
        # The body as sent makes the fingerprint; the job keeps the adapters' digests of now.
        idempotency = (idempotency_key, _fingerprint(body)) if idempotency_key else None
        created = await store.create(
            uuid.uuid4().hex,
            owner=owner,
            request=await pin_loras(body),
            base_url=str(request.base_url),
            attempt=uuid.uuid4().hex[:12],
            now=time.time(),
            idempotency=idempotency,
        )
        if not created.enqueued:
            try:
                await asyncio.to_thread(backend.queue.submit, created.job_id)
            except Exception as error:
                if created.new:
                    await store.forget(created.job_id)
                raise JobStoreUnavailable(
                    f"the job broker (Celery over Redis) did not take the job: {error}"
                ) from error
            await store.mark_enqueued(created.job_id)
        job = await store.job(created.job_id)
        assert job is not None
        return JSONResponse(
            job.model_dump(mode="json"),
            status_code=202,
            headers={"Location": f"/jobs/{job.id}"},
        )

    @router.get("/{job_id}", response_model=Job, responses={**responses, **not_found})
    async def get(job_id: JobId, owner: str = owner_of_key) -> Job:
        """A job: its state, progress, the images stored so far and its outcome."""
        job = await store.job(job_id, owner) if _JOB_ID.fullmatch(job_id) else None
        if job is None:
            raise _missing(job_id)
        return job

    @router.delete(
        "/{job_id}", response_model=Job, responses={**responses, **not_found, **conflict}
    )
    async def cancel(job_id: JobId, owner: str = owner_of_key) -> Job:
        """Cancel a job: a queued one never runs, a running one stops at its next denoising
        step and keeps the images stored so far."""
        before = None
        if _JOB_ID.fullmatch(job_id):
            before = await store.cancel(job_id, owner, time.time())
        if before is None:
            raise _missing(job_id)
        if before in FINAL_STATUSES:
            raise JobFinished(f"job {job_id} has ended already ({before})")
        if before == "queued":
            # It never runs: nobody else will say that it ended. A running one's runner does.
            telemetry.job_finished("cancelled")
            await ends.announce(job_id)
        job = await store.job(job_id)
        if job is None:
            raise _missing(job_id)
        return job

    return router
