"""Throughput benchmark: the raw pipeline's floor, the per-image loop and the service, side by side.

    .venv/bin/python -m bench.throughput --preset tiny
    bench/run.sh --preset small --markdown results.md   # in a private network namespace as root

1. the raw FluxPipeline in this process at batch sizes 1, 2, 4 and 8 (batch 1 is the original
   design's loop of one call per image), called as the service's workers call it;
2. the service over HTTP (plan, generate, score, store) on its own Ray instance, with the best
   batch size as FLUX_SERVE_MAX_BATCH_SIZE, at each concurrency: images/s, request latency and
   the arrival of the first streamed image;
3. many small requests at once, on workers that share batches across requests and, deployed
   again, on workers that give each request batches of its own;
4. the raw pipeline at its best batch size making the workload from an input image (at
   --image-strength) and from the prompt alone, in turns: images/s of each and their ratio;
5. with --speedups, the raw pipeline with each speed-up setting alone and all together, then
   with each quantization mode on top (int8 weight-only; fp8 where the GPU has it): the latency
   of one image, images/s, and how far the images move from the plain pipeline's.

Every measurement makes the same images: one request's jobs, with the service's default seeds.
A preset this machine can't hold (full, on a CPU) runs at its reduced size instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from bench.cluster import RunningService, ServiceSetup, private_redis, running_service
from bench.image_timing import measure_image_inputs
from bench.pipeline_timing import measure_pipeline
from bench.presets import PRESETS, ensure_preset, runnable_preset
from bench.report import (
    Results,
    SharingFigures,
    best_batch_size,
    publish,
    to_markdown,
    to_text,
)
from bench.service_timing import ServiceFigures, measure_service
from bench.speedup_timing import SpeedupTimer, measure_speedups
from bench.workload import Workload
from serve_app.generation.quantization import fp8_problem
from serve_app.models.sources import select_device, select_dtype
from serve_app.models.tiny import TINY_CLIP_NAME, ensure_tiny_model
from serve_app.settings import ServiceSettings, get_settings

logger = logging.getLogger("bench")


def _counts(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,2,4, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.throughput", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size")
    parser.add_argument("--size", type=int, default=256, help="image width and height")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps (euler)")
    parser.add_argument("--images", type=int, default=16, help="images per request and per pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each measurement")
    parser.add_argument(
        "--batch-sizes", type=_counts, default=[1, 2, 4, 8], help="raw pipeline batch sizes"
    )
    parser.add_argument(
        "--concurrency", type=_counts, default=[1, 4], help="concurrent clients of the service"
    )
    parser.add_argument(
        "--requests-per-client", type=int, default=2, help="requests each client sends per repeat"
    )
    parser.add_argument(
        "--small-requests",
        type=int,
        default=1,
        help="images per request in the shared-batches comparison (0: leave it out)",
    )
    parser.add_argument(
        "--small-concurrency", type=int, default=8, help="clients in the shared-batches comparison"
    )
    parser.add_argument(
        "--small-requests-per-client",
        type=int,
        default=8,
        help="requests each client sends per repeat in the shared-batches comparison",
    )
    parser.add_argument(
        "--image-strength",
        type=float,
        default=0.5,
        help="strength of the image-to-image measurement (0: leave it out)",
    )
    parser.add_argument(
        "--speedups", action="store_true", help="also time each speed-up setting (slow to compile)"
    )
    parser.add_argument(
        "--attention-backends",
        type=lambda text: [name for name in text.split(",") if name],
        default=None,
        help="diffusers attention backends to try with --speedups "
        "(default: _native_flash,_native_cudnn on a GPU, none on a CPU)",
    )
    parser.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode with --speedups (default: max-autotune on a GPU, else default)",
    )
    parser.add_argument(
        "--prompt", default="a photo of a red cat in the city", help="the prompt of every image"
    )
    parser.add_argument(
        "--ray-cpus", type=int, default=8, help="logical CPUs of the benchmark's Ray instance"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where presets are built (FLUX_SERVE_CACHE_DIR)",
    )
    parser.add_argument("--markdown", type=Path, default=None, help="also write Markdown here")
    args = parser.parse_args(argv)
    if 1 not in args.batch_sizes:
        args.batch_sizes.insert(0, 1)  # the per-image loop is always measured
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 2 when the preset cannot run on this machine."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    # Others' work on a shared machine moves the figures: say how busy it was before we began.
    machine = f"{os.cpu_count()} CPUs, 1-minute load average {os.getloadavg()[0]:.2f} at the start"
    preset = PRESETS[args.preset]
    cache_dir: Path = args.cache_dir or get_settings().cache_dir
    workload = Workload(prompt=args.prompt, images=args.images, size=args.size, steps=args.steps)
    settings = ServiceSettings(
        cache_dir=cache_dir,
        default_width=args.size,
        default_height=args.size,
        max_batch_size=max(args.batch_sizes),
        warmup=False,
    )
    device = select_device(settings)
    dtype = select_dtype(settings, device)
    preset, problem = runnable_preset(preset, device, dtype, cache_dir)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    logger.info("preset %s: building or reusing it under %s", preset.name, cache_dir)
    model = ensure_preset(preset, cache_dir)
    ensure_tiny_model(TINY_CLIP_NAME, cache_dir)  # the service's scorer, built before replicas race
    settings = settings.model_copy(update={"model": str(model)})

    logger.info("raw pipeline: batch sizes %s, %d repeats", args.batch_sizes, args.repeats)
    batch_rates = measure_pipeline(settings, workload, args.batch_sizes, args.repeats)
    best = best_batch_size(batch_rates)
    image_inputs = None
    if args.image_strength:
        logger.info("image-to-image at strength %g against text-to-image", args.image_strength)
        image_inputs = measure_image_inputs(
            settings, workload, best, args.repeats, args.image_strength
        )
    threads = f", {torch.get_num_threads()} torch threads" if device.type == "cpu" else ""
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""

    setup = ServiceSetup(
        model=model,
        cache_dir=cache_dir,
        size=args.size,
        max_batch_size=best,
        ray_cpus=args.ray_cpus,
        gpus=torch.cuda.device_count(),
    )
    logger.info("service: max batch size %d, concurrency %s", best, args.concurrency)
    small_workload = replace(workload, images=args.small_requests)

    def small_requests(service: RunningService) -> ServiceFigures:
        (figures,) = measure_service(
            service,
            small_workload,
            [args.small_concurrency],
            args.repeats,
            args.small_requests_per_client,
        )
        return figures

    sharing = None
    with private_redis() as redis_url:
        setup = replace(setup, redis_url=redis_url)
        with running_service(setup) as service:
            figures = measure_service(
                service, workload, args.concurrency, args.repeats, args.requests_per_client
            )
            shared = small_requests(service) if args.small_requests else None
        if shared is not None:
            logger.info("service again, each request in batches of its own")
            with running_service(replace(setup, batch_across_requests=False)) as service:
                sharing = SharingFigures(args.small_requests, shared, small_requests(service))
    speedups = []
    if args.speedups:
        cuda = device.type == "cuda"
        backends = args.attention_backends
        if backends is None:
            backends = ["_native_flash", "_native_cudnn"] if cuda else []
        compile_mode = args.compile_mode or ("max-autotune" if cuda else "default")
        quantize_modes = ["int8_weight_only"] + ([] if fp8_problem(device) else ["fp8"])
        timer = SpeedupTimer(settings, workload, best, args.repeats)
        speedups = measure_speedups(timer, backends, compile_mode, quantize_modes)
    results = Results(
        preset=preset.name,
        preset_description=preset.description,
        workload=workload,
        repeats=args.repeats,
        pipeline_device=f"{device.type}{gpu}, {str(dtype).removeprefix('torch.')}{threads}",
        batch_rates=batch_rates,
        service=figures,
        service_batch_size=best,
        sharing=sharing,
        speedups=speedups,
        image_inputs=image_inputs,
        machine=machine,
    )
    publish(to_text(results), to_markdown(results), args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
