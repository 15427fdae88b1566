"""The GPU measurement in one command that fits a short GPU lease: bench/gpu.sh.

    bench/gpu.sh                                  # H100 or H200: within 8 minutes, loading included
    bench/gpu.sh --budget-s 300 --out results.md  # less time: the steps that don't fit are skipped

FLUX.1-schnell's architecture with random weights (timing does not depend on them), built in place
on the GPU in bfloat16 (seconds, no disk), at 1024x1024 in 4 steps, through the service's own
FluxGenerator (prompts encoded once, as a worker does):

1. as built: one image's latency, and images/s at batch 4;
2. with the lossless speed-ups together: fused QKV, channels-last VAE, the fastest attention
   backend that runs here, torch.compile (max-autotune without CUDA graphs, by blocks, which
   compiles in a fraction of the time of the whole model), its compile time apart;
3. with fp8 quantization on top (int8 weight-only where the GPU has no fp8), and how far its
   images move from step 1's;
4. the service end to end on step 2's pipeline, as one worker replica runs it (its scheduler,
   scoring, PNG encoding, storage, HTTP and streaming, in this process, without Ray):
   16-image requests one after another, images/s against step 2's, and the first image's arrival.

Step 4 runs before step 3, which changes the pipeline in place. The results file is rewritten
after every measurement, so a run cut off still leaves what it measured. Before each step the run
compares the time left with what the step will take (from what it has measured so far and the
compile estimate) and skips what would not fit, saying so in the file. On a machine without a GPU
the same steps run on the reduced-depth preset (a test runs it so, small and short).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.presets import PRESETS, build_on, runnable_preset
from bench.service_timing import timed_rounds
from bench.stats import median, percentile
from bench.workload import Workload
from serve_app.generation.pipeline import FluxGenerator
from serve_app.generation.quantization import fp8_problem, quantize_transformer
from serve_app.generation.speedups import apply_speedups, compile_pipeline, enabled_speedups
from serve_app.settings import ServiceSettings, get_settings

logger = logging.getLogger("bench.gpu")

# Attention backends worth trying on a GPU, fastest first where they run at all.
GPU_ATTENTION_BACKENDS = ("_flash_3", "flash", "_native_cudnn", "_native_flash")
# The targets: seconds per 1024x1024 image (steps 2 and 3), service over raw (step 4).
LOSSLESS_IMAGE_S = 1.0
FP8_IMAGE_S = 0.6
SERVICE_OVER_RAW = 0.95


@dataclass
class Budget:
    """Wall-clock seconds the run may take, counted from its start."""

    seconds: float
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        """Seconds still available."""
        return self.seconds - (time.monotonic() - self.started)

    def fits(self, estimate_s: float) -> bool:
        """Whether a step estimated at ``estimate_s`` ends within the budget."""
        return estimate_s <= self.left()


@dataclass(frozen=True)
class PipelineRow:
    """One state of the pipeline, timed."""

    step: str
    name: str
    image_s: float
    """One image alone: median of the repeats."""
    images_per_s: float
    """One batch: median of the repeats."""
    warmup_s: float
    """The first call of each shape, where compiling happens."""
    pixel_difference: float | None
    """Mean absolute difference from step 1's images, in 0..255 units."""


@dataclass(frozen=True)
class ServiceRow:
    """The service end to end, one request at a time."""

    images_per_request: int
    requests: int
    images_per_s: float
    latency_p50_s: float
    first_image_p50_s: float
    raw_images_per_s: float


@dataclass
class ResultsFile:
    """The run's Markdown report, rewritten whole after each change (a cut-off run keeps it)."""

    path: Path
    header: str
    pipeline: list[PipelineRow] = field(default_factory=list)
    service: list[ServiceRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, item: PipelineRow | ServiceRow | str) -> None:
        """Record a row or a note, and write the file again."""
        if isinstance(item, PipelineRow):
            self.pipeline.append(item)
        elif isinstance(item, ServiceRow):
            self.service.append(item)
        else:
            logger.warning("%s", item)
            self.notes.append(item)
        self.write()

    def write(self) -> None:
        """Replace the file with the report as it stands (renamed into place whole)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_name(f".{self.path.name}.partial")
        staging.write_text(self.markdown())
        os.replace(staging, self.path)

    def markdown(self) -> str:
        """Header, the pipeline table, the service table, then the notes."""
        parts = [self.header]
        if self.pipeline:
            base = self.pipeline[0].images_per_s
            lines = [
                "| step | pipeline | one image | images/s | vs step 1 | warm-up (compile) "
                "| pixel difference |",
                "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
            ]
            for row in self.pipeline:
                difference = "" if row.pixel_difference is None else f"{row.pixel_difference:.3f}"
                lines.append(
                    f"| {row.step} | {row.name} | {row.image_s:.3f} s | {row.images_per_s:.3f} "
                    f"| {row.images_per_s / base:.2f} | {row.warmup_s:.1f} s | {difference} |"
                )
            parts.append("\n".join(lines))
        if self.service:
            lines = [
                "| step | service, one request at a time | images/s | vs step 2 raw "
                f"(target >= {SERVICE_OVER_RAW}) | latency p50 | first image p50 |",
                "| --- | --- | ---: | ---: | ---: | ---: |",
            ]
            for service in self.service:
                lines.append(
                    f"| 4 | {service.requests} requests of {service.images_per_request} images "
                    f"| {service.images_per_s:.3f} "
                    f"| {service.images_per_s / service.raw_images_per_s:.3f} "
                    f"| {service.latency_p50_s:.2f} s | {service.first_image_p50_s:.2f} s |"
                )
            parts.append("\n".join(lines))
        if self.notes:
            parts.append("\n".join(f"- {note}" for note in self.notes))
        return "\n\n".join(parts) + "\n"


def skipped(results: ResultsFile, budget: Budget, step: str, estimate_s: float) -> bool:
    """Whether ``step``, estimated at ``estimate_s``, would overrun the budget; if so, the
    report says that it was skipped and why."""
    if budget.fits(estimate_s):
        return False
    results.add(
        f"step {step} skipped: it needs about {estimate_s:.0f} s, {budget.left():.0f} s are left"
    )
    return True


def _pixels(images: list[Any]) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


class PipelineSteps:
    """Times one generator's pipeline as it is changed step by step."""

    def __init__(self, generator: FluxGenerator, workload: Workload, batch: int, repeats: int):
        self.generator = generator
        self.jobs = workload.jobs(generator.settings)
        self.batch = batch
        self.repeats = repeats
        self.reference: np.ndarray | None = None
        self.last: PipelineRow | None = None

    def seconds(self, count: int) -> float:
        """Seconds to make the first ``count`` jobs in one pipeline call."""
        started = time.perf_counter()
        self.generator.sample(self.jobs[:count])
        return time.perf_counter() - started

    def estimate_s(self, extra_s: float = 0.0) -> float:
        """What timing one more state takes, going by the last one, plus ``extra_s``."""
        if self.last is None:
            return extra_s
        per_round = self.last.image_s + self.batch / self.last.images_per_s
        return extra_s + (1 + self.repeats) * per_round

    def measure(self, step: str, name: str) -> PipelineRow:
        """Warm up each shape (compiling, if it is on), then time one image and one batch."""
        started = time.perf_counter()
        images = _pixels(self.generator.sample(self.jobs[: self.batch]))
        self.seconds(1)
        warmup_s = time.perf_counter() - started
        if self.reference is None:
            self.reference = images
        image_s = median([self.seconds(1) for _ in range(self.repeats)])
        batch_s = median([self.seconds(self.batch) for _ in range(self.repeats)])
        self.last = PipelineRow(
            step=step,
            name=name,
            image_s=image_s,
            images_per_s=self.batch / batch_s,
            warmup_s=warmup_s,
            pixel_difference=float(np.abs(images - self.reference).mean()),
        )
        return self.last


def fastest_attention_backend(steps: PipelineSteps, candidates: Sequence[str]) -> str | None:
    """The backend under which one image is made fastest, if any beats PyTorch's own choice;
    a backend that fails here (not installed, not for this GPU) is passed over."""
    transformer = steps.generator.pipeline.transformer
    steps.seconds(1)
    best, best_s = None, steps.seconds(1)
    for backend in candidates:
        try:
            transformer.set_attention_backend(backend)
            steps.seconds(1)
            seconds = steps.seconds(1)
        except Exception as error:  # noqa: BLE001 - any failure rules the backend out
            logger.info("attention backend %s does not run here: %s", backend, error)
            continue
        if seconds < best_s:
            best, best_s = backend, seconds
    transformer.set_attention_backend(best or "native")
    return best


async def _ready() -> Any:
    from serve_app.schemas import Readiness

    return Readiness(ready=True, detail="ok")


async def measure_service_in_process(
    generator: FluxGenerator, workload: Workload, requests: int, raw_images_per_s: float
) -> ServiceRow:
    """The service's request flow on ``generator``, over HTTP on 127.0.0.1, one request at a
    time: one untimed request, then ``requests`` timed ones."""
    import uvicorn

    from serve_app.api.routes import create_app
    from serve_app.generation.scheduling import RenderScheduler
    from serve_app.models.scoring import ClipScorer
    from serve_app.service import GenerationService
    from serve_app.storage.local import LocalImageStore

    settings = generator.settings
    scheduler = RenderScheduler(
        generator, max_batch_size=settings.max_batch_size, across_calls=True
    )
    scorer = ClipScorer(settings)

    async def score(prompt: str, images: list[bytes]) -> list[float]:
        return await asyncio.to_thread(scorer.score, prompt, images)

    body = workload.request_body(stream=True)
    with tempfile.TemporaryDirectory(prefix="flux-gpu-bench-") as storage:
        store = LocalImageStore(Path(storage), public_base_url=None)
        app = create_app(GenerationService(settings, scheduler.render, score, store), _ready)
        listener = socket.create_server(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        serving = asyncio.create_task(server.serve(sockets=[listener]))
        try:
            while not server.started:
                if serving.done():
                    serving.result()  # raises what stopped the server
                await asyncio.sleep(0.01)
            host, port = listener.getsockname()[:2]
            url = f"http://{host}:{port}"
            await timed_rounds(url, body, 1, 1, 1)
            rates, timings = await timed_rounds(url, body, 1, requests, 1)
        finally:
            server.should_exit = True
            await serving
            listener.close()
    return ServiceRow(
        images_per_request=workload.images,
        requests=requests,
        images_per_s=median(rates),
        latency_p50_s=percentile([timing.latency_s for timing in timings], 0.5),
        first_image_p50_s=percentile([timing.first_image_s for timing in timings], 0.5),
        raw_images_per_s=raw_images_per_s,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="bench/gpu.sh", description=__doc__.split("\n", 1)[0] if __doc__ else None
    )
    parser.add_argument("--out", type=Path, default=Path("var/gpu-results.md"), help="report")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock seconds")
    parser.add_argument("--size", type=int, default=1024, help="image width and height")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps (euler)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per pipeline call")
    parser.add_argument("--images", type=int, default=16, help="images per service request")
    parser.add_argument("--requests", type=int, default=2, help="timed service requests")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each figure")
    parser.add_argument(
        "--compile-mode",
        default=None,
        choices=["off", "default", "max-autotune-no-cudagraphs", "max-autotune"],
        help="torch.compile mode of step 2 (default: max-autotune-no-cudagraphs on a GPU: CUDA "
        "graphs are recorded per thread and per block, and a 1024x1024 image is compute-bound; "
        "default elsewhere)",
    )
    parser.add_argument(
        "--compile-scope", default="blocks", choices=["whole", "blocks"], help="what compiles"
    )
    parser.add_argument(
        "--compile-estimate-s",
        type=float,
        default=None,
        help="what compiling is expected to take, per step (default: 200 on a GPU, 60 elsewhere)",
    )
    parser.add_argument("--prompt", default="a photo of a red cat in the city", help="prompt")
    return parser.parse_args(argv)


def _header(args: argparse.Namespace, device: torch.device) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    return (
        f"# bench/gpu.sh on {gpu}\n\n"
        f"FLUX.1-schnell's architecture, random weights; {args.size}x{args.size}, "
        f"{args.steps} steps (euler); "
        f"batch {args.batch_size}; medians of {args.repeats} repeats; torch {torch.__version__}; "
        f"budget {args.budget_s:.0f} s; started {time.strftime('%Y-%m-%d %H:%M:%S')}. "
        f"Targets: one image <= {LOSSLESS_IMAGE_S} s lossless (step 2), <= {FP8_IMAGE_S} s with "
        f"fp8 (step 3); the service >= {SERVICE_OVER_RAW}x step 2's images/s (step 4)."
    )


def run(args: argparse.Namespace, budget: Budget, results: ResultsFile) -> None:
    """Every step that fits the budget, each recorded in ``results`` as it is measured."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = ServiceSettings(
        cache_dir=get_settings().cache_dir,
        default_width=args.size,
        default_height=args.size,
        max_batch_size=args.batch_size,
        warmup=False,
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    preset, problem = runnable_preset(
        PRESETS["full"], device, dtype, settings.cache_dir, in_place=True
    )
    if problem:
        results.add(f"nothing measured: {problem}")
        return
    results.add(f"preset {preset.name}: {preset.description}")
    cuda = device.type == "cuda"
    compile_mode = args.compile_mode or ("max-autotune-no-cudagraphs" if cuda else "default")
    compile_estimate_s = args.compile_estimate_s or (200.0 if cuda else 60.0)

    started = time.perf_counter()
    generator = FluxGenerator(settings, pipeline=build_on(preset, device, dtype))
    results.add(f"built and placed on {device.type} in {time.perf_counter() - started:.1f} s")
    workload = Workload(prompt=args.prompt, images=args.images, size=args.size, steps=args.steps)
    steps = PipelineSteps(generator, workload, args.batch_size, args.repeats)
    step1 = steps.measure("1", "as built, bf16" if cuda else "as built, float32")
    results.add(step1)

    lossless = settings.model_copy(
        update={
            "fuse_qkv": True,
            "channels_last_vae": True,
            "compile_mode": compile_mode,
            "compile_scope": args.compile_scope,
        }
    )
    candidates = GPU_ATTENTION_BACKENDS if cuda else ()
    compiling_s = compile_estimate_s if compile_mode != "off" else 0.0
    # Trying a backend: two images each, about step 1's.
    step2_s = steps.estimate_s(compiling_s) + 2 * len(candidates) * step1.image_s
    if skipped(results, budget, "2", step2_s):
        return
    backend = fastest_attention_backend(steps, candidates) if candidates else None
    lossless = lossless.model_copy(update={"attention_backend": backend})
    apply_speedups(generator.pipeline, lossless)  # the backend again, after fusing
    compile_pipeline(generator.pipeline, lossless)
    generator.settings = lossless
    step2 = steps.measure("2", ", ".join(enabled_speedups(lossless)))
    results.add(step2)

    service_s = (1 + args.requests) * args.images / step2.images_per_s * 1.2 + 10.0
    if not skipped(results, budget, "4", service_s):
        service = measure_service_in_process(generator, workload, args.requests, step2.images_per_s)
        results.add(asyncio.run(service))

    quantize = "fp8" if cuda and fp8_problem(device) is None else "int8_weight_only"
    step3_s = steps.estimate_s(compiling_s)
    if skipped(results, budget, "3", step3_s):
        return
    if quantize != "fp8":
        results.add("step 3 with int8_weight_only: fp8 needs a GPU of compute capability 8.9+")
    quantized = lossless.model_copy(update={"quantize": quantize})
    # The compiled graphs see the new weights and compile again at the next call.
    quantize_transformer(generator.pipeline, quantized, device)
    generator.settings = quantized
    results.add(steps.measure("3", f"step 2 + {quantize}"))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the steps; 0 when the report was written."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = ResultsFile(args.out, _header(args, device))
    try:
        run(args, budget, results)
    except Exception as error:  # recorded: what was measured stays in the file
        logger.exception("the run stopped")
        results.add(f"stopped by an error: {error!r}")
        return 1
    finally:
        results.add(f"ended after {args.budget_s - budget.left():.0f} s")
        print(results.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
