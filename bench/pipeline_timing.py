"""Times the raw FluxPipeline in this process, called exactly as the service's workers call it."""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence

import torch

from bench.stats import median
from bench.workload import Workload
from serve_app.generation.pipeline import FluxGenerator
from serve_app.generation.planning import SamplingJob
from serve_app.inputs.pixels import RenderInputs
from serve_app.settings import ServiceSettings


class PipelineTimer:
    """Makes a workload's images with the pipeline alone: no encoding, scoring or storage; from
    ``inputs`` where its jobs name input images."""

    def __init__(self, generator: FluxGenerator, inputs: RenderInputs | None = None) -> None:
        self.generator = generator
        self.inputs = inputs

    def call(self, batch: list[SamplingJob]) -> None:
        """One pipeline call, exactly as a FluxWorker makes it (its images come back as PIL
        images, so the GPU has finished when it returns)."""
        self.generator.sample(batch, inputs=self.inputs)

    def pass_seconds(self, jobs: list[SamplingJob], batch_size: int) -> float:
        """Seconds to make every job, ``batch_size`` images per call (1: a loop over images)."""
        started = time.perf_counter()
        # A workload's jobs share one batch key (Workload.jobs): any slice is one pipeline call.
        for start in range(0, len(jobs), batch_size):
            self.call(jobs[start : start + batch_size])
        return time.perf_counter() - started


def sweep_batch_sizes(
    timer: PipelineTimer, workload: Workload, batch_sizes: Sequence[int], repeats: int
) -> dict[int, float]:
    """Median images/s of each batch size over ``repeats`` passes.

    The repeats go round the batch sizes in turn, so that load from elsewhere on the machine falls
    on all of them alike rather than on whichever ran during a busy minute.
    """
    jobs = workload.jobs(timer.generator.settings)
    for size in batch_sizes:  # warm-up: lazy initialization and allocator growth per shape
        timer.call(jobs[:size])
    rates: dict[int, list[float]] = {size: [] for size in batch_sizes}
    for _ in range(repeats):
        for size in batch_sizes:
            rates[size].append(len(jobs) / timer.pass_seconds(jobs, size))
    return {size: median(values) for size, values in rates.items()}


def measure_pipeline(
    settings: ServiceSettings, workload: Workload, batch_sizes: Sequence[int], repeats: int
) -> dict[int, float]:
    """Load the service's own generator for ``settings``, sweep, and free the memory again."""
    timer = PipelineTimer(FluxGenerator(settings))
    rates = sweep_batch_sizes(timer, workload, batch_sizes, repeats)
    # The service loads its own copy next: give back this one's host and GPU memory first.
    del timer
    release_memory()
    return rates


def release_memory() -> None:
    """Give back the host and GPU memory of models no longer referenced."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
