"""Ingress: the FastAPI application, fanning requests out to FluxWorker and Scorer."""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ApplicationStatus

from deployments.handles import generation_service
from deployments.job_queue import CeleryJobQueue
from deployments.telemetry import RayTelemetry
from serve_app.api.jobs import JobBackend
from serve_app.api.routes import create_app
from serve_app.jobs.store import JobStore
from serve_app.schemas import Readiness
from serve_app.settings import get_settings
from serve_app.storage.base import StorageError
from serve_app.storage.factory import make_store

logger = logging.getLogger("ray.serve")


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
@serve.ingress()
class Ingress:
    """Validates and plans requests, then drives workers, scorer and storage; queues jobs."""

    def __init__(
        self,
        worker: DeploymentHandle,
        scorer: DeploymentHandle,
        consumers: list[DeploymentHandle],
    ) -> None:
        """``consumers`` (JobRunner, WebhookSender) are bound here so that they deploy with the
        application; their work comes from Celery, not through these handles."""
        settings = get_settings()
        self._consumers = consumers
        store = make_store(settings)
        try:
            store.check()
        except StorageError as error:
            # Stay up so that /healthz can say what is wrong; requests fail with a 503.
            logger.error("storage is not usable: %s", error)
        self.service = generation_service(worker, scorer, settings, store, RayTelemetry())
        self.jobs = JobBackend(
            JobStore(
                settings.redis_url,
                retention_s=settings.jobs_retention_s,
                idempotency_ttl_s=settings.idempotency_ttl_s,
            ),
            CeleryJobQueue(settings),
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Ray Serve's proxy already puts X-Request-Id (the client's, or its own) on every answer.
        return create_app(self.service, self._readiness, echo_request_id=False, jobs=self.jobs)

    async def _readiness(self) -> Readiness:
        app_name = serve.get_replica_context().app_name
        status = (await asyncio.to_thread(serve.status)).applications[app_name]
        if status.status == ApplicationStatus.RUNNING:
            return Readiness(ready=True, detail="ok")
        waiting = [
            f"{name}: {deployment.status.value}"
            for name, deployment in status.deployments.items()
            if deployment.status.value != "HEALTHY"
        ]
        return Readiness(ready=False, detail="; ".join(waiting) or status.status.value)
