"""LoRA benchmark: an adapter switch on a warm worker, and one adapter against a mix of four.

    .venv/bin/python -m bench.loras --preset tiny
    bench/run.sh loras --preset small --markdown loras.md   # in a private network namespace

1. on the service's own generator in this process: a batch with the adapter of the batch before,
   one after a switch between two adapters the worker holds, and one whose adapter it has to
   load; the switch's cost is held against one batch's time;
2. the service over HTTP on its own Ray instance: concurrent streamed requests that all apply one
   adapter, then requests that each apply one of four (never the same as the client beside), in
   turn; images/s of the mix against those of the one adapter.

The adapters are four of the usual shape (rank 16 on attention and feed-forward layers) made for
the preset's transformer; the tiny preset uses the tiny model's own library.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.cluster import ServiceSetup, private_redis, running_service
from bench.lora_timing import MixFigures, SwitchFigures, ensure_loras, measure_mix, measure_switches
from bench.presets import PRESETS, ensure_preset, runnable_preset
from bench.report import Ratio, Table, Target, publish
from bench.workload import Workload
from serve_app.models.sources import select_device, select_dtype
from serve_app.models.tiny import TINY_CLIP_NAME, ensure_tiny_model
from serve_app.settings import ServiceSettings, get_settings

logger = logging.getLogger("bench")

SWITCH = "adapter switch / batch"
MIX = "4-adapter mix / one adapter"
# The LoRA issue's targets: a switch costs less than a batch; on small, a mix keeps 0.8 of it.
TARGETS: dict[str, dict[str, Target]] = {
    "tiny": {SWITCH: Target(1.0, at_most=True)},
    "small": {SWITCH: Target(1.0, at_most=True), MIX: Target(0.8)},
}


@dataclass(frozen=True)
class LoraResults:
    """What one run measured."""

    preset: str
    workload: Workload
    repeats: int
    switches: SwitchFigures
    mix: MixFigures | None
    machine: str = ""

    def ratios(self) -> list[Ratio]:
        """The switch against a batch, the load against a batch, the mix against one adapter."""
        targets = TARGETS.get(self.preset, {})
        batch = self.switches.same_s
        found = [
            Ratio(SWITCH, self.switches.switch_s / batch, targets.get(SWITCH)),
            Ratio("adapter load / batch", self.switches.load_s / batch),
        ]
        if self.mix is not None:
            name = f"{MIX}, c{self.mix.concurrency}"
            value = self.mix.mix_images_per_s / self.mix.one_images_per_s
            found.append(Ratio(name, value, targets.get(MIX)))
        return found


def tables(results: LoraResults) -> list[Table]:
    """The measurements, then the ratios with their targets."""
    switches = results.switches
    batch = f"batch of {switches.batch_size}"
    rows = [
        [f"{batch}, the adapter of the batch before", f"{switches.same_s * 1000:.1f} ms", ""],
        [
            f"{batch}, after a switch between held adapters",
            f"{switches.switched_s * 1000:.1f} ms",
            "",
        ],
        [f"{batch}, loading its adapter first", f"{switches.loaded_s * 1000:.1f} ms", ""],
    ]
    if mix := results.mix:
        rows += [
            [
                f"service, one adapter, concurrency {mix.concurrency}",
                "",
                f"{mix.one_images_per_s:.2f}",
            ],
            [
                f"service, {mix.adapters} adapters mixed, concurrency {mix.concurrency}",
                "",
                f"{mix.mix_images_per_s:.2f}",
            ],
        ]
    ratios = [
        [ratio.name, f"{ratio.value:.3f}", str(ratio.target or ""), ratio.verdict]
        for ratio in results.ratios()
    ]
    return [
        Table(["measurement", "time (median)", "images/s (median)"], rows),
        Table(["ratio", "value", "target", "verdict"], ratios),
    ]


def summary(results: LoraResults) -> str:
    """What was measured, in one paragraph."""
    work = results.workload
    return (
        f"Preset {results.preset}, {work.size}x{work.size}, {work.steps} steps, {work.images} "
        f"images per request; medians of {results.repeats} repeats. A switch's cost is the "
        "batch after a switch less the batch without one."
        + (f" Machine: {results.machine}." if results.machine else "")
    )


def to_text(results: LoraResults) -> str:
    """The report for a terminal."""
    return "\n\n".join([summary(results), *(table.text() for table in tables(results))])


def to_markdown(results: LoraResults) -> str:
    """The report as Markdown."""
    return "\n\n".join([summary(results), *(table.markdown() for table in tables(results))]) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.loras", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("--preset", choices=["tiny", "small"], default="tiny", help="model size")
    parser.add_argument("--size", type=int, default=256, help="image width and height")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps (euler)")
    parser.add_argument("--images", type=int, default=4, help="images per request (and batch)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each measurement")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent clients")
    parser.add_argument(
        "--requests-per-client", type=int, default=2, help="requests each client sends per round"
    )
    parser.add_argument(
        "--no-service", action="store_true", help="time the switches only, in this process"
    )
    parser.add_argument(
        "--ray-cpus", type=int, default=8, help="logical CPUs of the benchmark's Ray instance"
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="where presets are built")
    parser.add_argument("--markdown", type=Path, default=None, help="also write Markdown here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 2 when the preset cannot run on this machine."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    machine = f"{os.cpu_count()} CPUs, 1-minute load average {os.getloadavg()[0]:.2f} at the start"
    cache_dir: Path = args.cache_dir or get_settings().cache_dir
    workload = Workload(prompt="a red cat", images=args.images, size=args.size, steps=args.steps)
    settings = ServiceSettings(
        cache_dir=cache_dir,
        default_width=args.size,
        default_height=args.size,
        max_batch_size=args.images,
        warmup=False,
    )
    device = select_device(settings)
    preset, problem = runnable_preset(
        PRESETS[args.preset], device, select_dtype(settings, device), cache_dir
    )
    if problem:
        print(problem, file=sys.stderr)
        return 2
    model = ensure_preset(preset, cache_dir)
    library, names = ensure_loras(model, cache_dir)
    settings = settings.model_copy(update={"model": str(model), "lora_dir": library})
    logger.info("adapter switches on %s, batches of %d", preset.name, args.images)
    switches = measure_switches(settings, workload, names, args.images, args.repeats)
    mix = None
    if not args.no_service:
        ensure_tiny_model(TINY_CLIP_NAME, cache_dir)  # the scorer, built before replicas race
        with private_redis() as redis_url:
            setup = ServiceSetup(
                model=model,
                cache_dir=cache_dir,
                size=args.size,
                max_batch_size=args.images,
                ray_cpus=args.ray_cpus,
                gpus=torch.cuda.device_count(),
                lora_dir=library,
                redis_url=redis_url,
            )
            with running_service(setup) as service:
                logger.info("service: one adapter, then a mix of %d", len(names))
                mix = measure_mix(
                    service,
                    workload,
                    names,
                    args.concurrency,
                    args.repeats,
                    args.requests_per_client,
                )
    results = LoraResults(preset.name, workload, args.repeats, switches, mix, machine)
    publish(to_text(results), to_markdown(results), args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
