"""Times the raw pipeline with each speed-up setting, and checks that none changes the images."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.pipeline_timing import PipelineTimer, release_memory
from bench.stats import median
from bench.workload import Workload
from serve_app.generation.pipeline import FluxGenerator
from serve_app.generation.speedups import enabled_speedups
from serve_app.settings import ServiceSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeedupFigures:
    """The raw pipeline with one set of speed-ups."""

    name: str
    image_latency_s: float
    """One image alone (batch 1), from prompt to decoded image: median of the repeats."""
    images_per_s: float
    """The whole workload at the benchmark's batch size: median of the repeats."""
    pixel_difference: float
    """Mean absolute difference from the images without speed-ups, in 0..255 units."""
    warmup_s: float
    """The first calls of each shape, where compiling happens."""


def _pixels(images: list[Any]) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


class SpeedupTimer:
    """Loads the service's generator with some speed-ups and times it on one workload."""

    def __init__(
        self, settings: ServiceSettings, workload: Workload, batch_size: int, repeats: int
    ) -> None:
        self.settings = settings.model_copy(update={"warmup": False})
        self.workload = workload
        self.batch_size = batch_size
        self.repeats = repeats
        self._plain_images: np.ndarray | None = None

    def measure(self, speedups: dict[str, Any]) -> SpeedupFigures:
        """Figures with ``speedups`` on; the first measurement is the reference for pixels."""
        settings = self.settings.model_copy(update=speedups)
        generator = FluxGenerator(settings)
        timer = PipelineTimer(generator)
        jobs = self.workload.jobs(settings)
        started = time.perf_counter()
        images = _pixels(generator.sample(jobs[: self.batch_size]))  # compiles each shape once
        timer.call(jobs[:1])
        warmup_s = time.perf_counter() - started
        if self._plain_images is None:
            self._plain_images = images
        latencies, rates = [], []
        for _ in range(self.repeats):
            latencies.append(timer.pass_seconds(jobs[:1], 1))
            rates.append(len(jobs) / timer.pass_seconds(jobs, self.batch_size))
        del timer, generator
        release_memory()
        names = enabled_speedups(settings)
        if settings.quantize != "none":
            names.append(f"quantize {settings.quantize}")
        return SpeedupFigures(
            name=", ".join(names) or "none",
            image_latency_s=median(latencies),
            images_per_s=median(rates),
            pixel_difference=float(np.abs(images - self._plain_images).mean()),
            warmup_s=warmup_s,
        )


def measure_speedups(
    timer: SpeedupTimer,
    attention_backends: Sequence[str],
    compile_mode: str,
    quantize_modes: Sequence[str] = (),
) -> list[SpeedupFigures]:
    """The plain pipeline, each speed-up alone, then all of them together (with the attention
    backend that made an image fastest, where one beat the default), then each quantization
    mode on top of them all (lossy: the pixel difference says how far the images move)."""
    plain = timer.measure({})
    singles: list[dict[str, Any]] = [
        {"fuse_qkv": True},
        {"channels_last_vae": True},
        *({"attention_backend": backend} for backend in attention_backends),
        {"compile_mode": compile_mode},
    ]
    alone = [timer.measure(changes) for changes in singles]
    together: dict[str, Any] = {}
    fastest = plain.image_latency_s
    for changes, figures in zip(singles, alone, strict=True):
        if "attention_backend" not in changes:
            together.update(changes)
        elif figures.image_latency_s < fastest:
            fastest = figures.image_latency_s
            together["attention_backend"] = changes["attention_backend"]
    logger.info("speed-ups together: %s", together)
    quantized = [timer.measure({**together, "quantize": mode}) for mode in quantize_modes]
    return [plain, *alone, timer.measure(together), *quantized]
