"""The request flow on Ray Serve handles: FluxWorker renders, Scorer scores, with Ray's failures
turned into the ones the flow knows. The ingress and the job runner both drive it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serve_app.faults import Overloaded, WorkerLost
from serve_app.generation.adapter_library import AdapterRefused
from serve_app.generation.adapter_sources import LibraryUnavailable
from serve_app.generation.pipeline import RenderedImage
from serve_app.generation.planning import SamplingJob
from serve_app.inputs.pixels import RenderInputs
from serve_app.service import GenerationService
from serve_app.settings import ServiceSettings
from serve_app.storage.base import ImageStore
from serve_app.telemetry import Telemetry


@contextlib.contextmanager
def replica_faults(deployment: str) -> Iterator[None]:
    """Ray's errors as the request flow knows them: a lost replica can be retried elsewhere, a
    full queue means overload, a refused adapter is the client's error."""
    try:
        yield
    except AdapterRefused as error:
        # Ray wraps these (RayTaskError, with the replica's traceback as its text): unwrap them.
        raise AdapterRefused(error.position, error.field, error.reason) from None
    except LibraryUnavailable as error:
        raise LibraryUnavailable(str(getattr(error, "cause", error))) from None
    except (RayActorError, ActorUnavailableError) as error:
        raise WorkerLost(f"a {deployment} replica was lost: {type(error).__name__}") from error
    except BackPressureError as error:
        raise Overloaded(f"the {deployment} queue is full") from error


def generation_service(
    worker: DeploymentHandle,
    scorer: DeploymentHandle,
    settings: ServiceSettings,
    store: ImageStore,
    telemetry: Telemetry,
) -> GenerationService:
    """A GenerationService whose render calls go to FluxWorker and scoring calls to Scorer."""
    streaming = worker.options(stream=True)

    async def render(
        jobs: list[SamplingJob], inputs: RenderInputs
    ) -> AsyncIterator[list[RenderedImage]]:
        with replica_faults("FluxWorker"):
            async for batch in streaming.render.remote(jobs, inputs):
                yield batch

    async def score(prompt: str, images: list[bytes]) -> list[float]:
        with replica_faults("Scorer"):
            return await scorer.score.remote(prompt, images)  # type: ignore[no-any-return]

    return GenerationService(settings, render, score, store, telemetry)
