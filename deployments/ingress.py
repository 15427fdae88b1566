"""Ingress: the FastAPI application, fanning requests out to FluxWorker and Scorer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator

from fastapi import FastAPI
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ApplicationStatus

from deployments.telemetry import RayTelemetry
from serve_app.api.routes import create_app
from serve_app.faults import Overloaded, WorkerLost
from serve_app.generation.pipeline import RenderedImage
from serve_app.generation.planning import SamplingJob
from serve_app.inputs.pixels import RenderInputs
from serve_app.schemas import Readiness
from serve_app.service import GenerationService
from serve_app.settings import get_settings
from serve_app.storage.base import StorageError
from serve_app.storage.factory import make_store

logger = logging.getLogger("ray.serve")


@contextlib.contextmanager
def replica_faults(deployment: str) -> Iterator[None]:
    """Ray's errors as the request flow knows them: a lost replica can be retried elsewhere, a
    full queue means overload."""
    try:
        yield
    except (RayActorError, ActorUnavailableError) as error:
        raise WorkerLost(f"a {deployment} replica was lost: {type(error).__name__}") from error
    except BackPressureError as error:
        raise Overloaded(f"the {deployment} queue is full") from error


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
@serve.ingress()
class Ingress:
    """Validates and plans requests, then drives workers, scorer and storage."""

    def __init__(self, worker: DeploymentHandle, scorer: DeploymentHandle) -> None:
        settings = get_settings()
        self._worker = worker.options(stream=True)
        self._scorer = scorer
        store = make_store(settings)
        try:
            store.check()
        except StorageError as error:
            # Stay up so that /healthz can say what is wrong; requests fail with a 503.
            logger.error("storage is not usable: %s", error)
        self.service = GenerationService(settings, self._render, self._score, store, RayTelemetry())

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Ray Serve's proxy already puts X-Request-Id (the client's, or its own) on every answer.
        return create_app(self.service, self._readiness, echo_request_id=False)

    async def _render(
        self, jobs: list[SamplingJob], inputs: RenderInputs
    ) -> AsyncIterator[list[RenderedImage]]:
        with replica_faults("FluxWorker"):
            async for batch in self._worker.render.remote(jobs, inputs):
                yield batch

    async def _score(self, prompt: str, images: list[bytes]) -> list[float]:
        with replica_faults("Scorer"):
            return await self._scorer.score.remote(prompt, images)  # type: ignore[no-any-return]

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
