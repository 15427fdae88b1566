"""FluxWorker: one loaded FLUX pipeline per replica (one GPU each on GPU clusters)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from ray import serve

from deployments.telemetry import RayTelemetry
from serve_app.generation import FluxGenerator, RenderedImage, render_stream
from serve_app.planning import SamplingJob
from serve_app.settings import get_settings


# Defaults for one CPU machine; config/serve.yaml and the RayService manifest set the real values.
@serve.deployment(ray_actor_options={"num_cpus": 0.5, "num_gpus": 0}, max_ongoing_requests=1)
class FluxWorker:
    """Makes the images of sampling jobs, batch by batch."""

    def __init__(self) -> None:
        self.generator = FluxGenerator(get_settings())
        self.telemetry = RayTelemetry()

    async def render(self, jobs: list[SamplingJob]) -> AsyncIterator[list[RenderedImage]]:
        """Yield each batch of images as soon as the pipeline has made it."""
        async for batch in render_stream(self.generator, jobs, self.telemetry):
            yield batch

    async def check_health(self) -> None:
        """Ray Serve restarts the replica when this raises: the model can no longer run."""
        await asyncio.to_thread(self.generator.check)

    def placement(self) -> dict[str, str]:
        """Which accelerator this replica was given and which device it computes on."""
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            "device": str(self.generator.device),
        }
