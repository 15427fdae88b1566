"""FluxWorker: one loaded FLUX pipeline per replica (one GPU each on GPU clusters)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import ray
import torch
from ray import serve

from deployments.routing import ADAPTERS_STAT
from deployments.telemetry import RayTelemetry
from serve_app.generation.pipeline import FluxGenerator, RenderedImage
from serve_app.generation.planning import SamplingJob
from serve_app.generation.scheduling import RenderScheduler
from serve_app.inputs.pixels import RenderInputs
from serve_app.settings import get_settings


# Defaults for one CPU machine; config/serve.yaml and the RayService manifest set the real values.
@serve.deployment(
    ray_actor_options={"num_cpus": 0.5, "num_gpus": 0},
    max_ongoing_requests=8,
    request_router_config={
        "request_router_class": "deployments.routing:RenderCallRouter",
        # How often each replica tells the routers which adapters it holds (record_routing_stats).
        "request_routing_stats_period_s": 2,
    },
)
class FluxWorker:
    """Makes the images of sampling jobs, batch by batch, for every render call it holds."""

    def __init__(self) -> None:
        settings = get_settings()
        telemetry = RayTelemetry()
        self.generator = FluxGenerator(settings, telemetry=telemetry)
        self.scheduler = RenderScheduler(
            self.generator,
            max_batch_size=settings.max_batch_size,
            across_calls=settings.batch_across_requests,
            telemetry=telemetry,
            worker=serve.get_replica_context().replica_id.unique_id,
        )

    async def render(
        self, jobs: list[SamplingJob], inputs: RenderInputs | None = None
    ) -> AsyncIterator[list[RenderedImage]]:
        """Yield each group of images as soon as its batch is made; ``inputs`` carries the
        input images the jobs name, once for the whole call."""
        async for batch in self.scheduler.render(jobs, inputs):
            yield batch

    def record_routing_stats(self) -> dict[str, list[str]]:
        """What Ray Serve hands the routers (deployments/routing.py): the adapters loaded here."""
        adapters = self.generator.adapters
        return {ADAPTERS_STAT: adapters.loaded if adapters is not None else []}

    async def check_health(self) -> None:
        """Ray Serve restarts the replica when this raises: the model can no longer run."""
        await asyncio.to_thread(self.generator.check)

    def placement(self) -> dict[str, str]:
        """Which node and accelerator this replica was given, which device it computes on, and
        with how many torch threads."""
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "node_id": ray.get_runtime_context().get_node_id(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            "device": str(self.generator.device),
            "torch_threads": str(torch.get_num_threads()),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        }
