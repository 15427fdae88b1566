"""The benchmark's results, their ratios against the issue's targets, as text and Markdown."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bench.image_timing import ImageInputFigures
from bench.service_timing import ServiceFigures
from bench.speedup_timing import SpeedupFigures
from bench.workload import Workload


@dataclass(frozen=True)
class Target:
    """A bound a ratio should meet: at least ``bound``, or at most it."""

    bound: float
    at_most: bool = False

    def met_by(self, value: float) -> bool:
        """Whether ``value`` is within the bound."""
        return value <= self.bound if self.at_most else value >= self.bound

    def __str__(self) -> str:
        return f"{'<=' if self.at_most else '>='} {self.bound:.2f}"


BATCHED = "batched / per-image"
FIRST_IMAGE = "first image / latency (p50)"
SHARED = "shared / own batches"
IMAGE_TO_IMAGE = "image-to-image / text-to-image"
# It runs fewer denoising steps, so it should be faster, whatever the preset.
IMAGE_TO_IMAGE_TARGET = Target(1.0)

# The throughput issue's targets, per preset, for this repository's 2-core CPU machines.
TARGETS: dict[str, dict[str, Target]] = {
    "tiny": {BATCHED: Target(1.3)},
    "small": {
        BATCHED: Target(1.0),
        "service c4 / floor": Target(0.85),
        f"{FIRST_IMAGE}, c1": Target(0.5, at_most=True),
        f"{FIRST_IMAGE}, c4": Target(0.5, at_most=True),
    },
}


@dataclass(frozen=True)
class Ratio:
    """A ratio of two measurements, with the target it is held to, if any."""

    name: str
    value: float
    target: Target | None = None

    @property
    def verdict(self) -> str:
        """'met', 'missed' or empty (no target)."""
        if self.target is None:
            return ""
        return "met" if self.target.met_by(self.value) else "missed"


@dataclass(frozen=True)
class SharingFigures:
    """Many small requests at once, on workers that share batches across requests and on
    workers that give each request batches of its own."""

    images_per_request: int
    shared: ServiceFigures
    own: ServiceFigures


def best_batch_size(rates: dict[int, float]) -> int:
    """The batch size with the most images/s (the smaller one on a tie)."""
    return max(sorted(rates), key=lambda size: rates[size])


@dataclass(frozen=True)
class Results:
    """Everything one benchmark run measured."""

    preset: str
    preset_description: str
    workload: Workload
    repeats: int
    pipeline_device: str
    batch_rates: dict[int, float]
    service: list[ServiceFigures] = field(default_factory=list)
    service_batch_size: int | None = None
    sharing: SharingFigures | None = None
    speedups: list[SpeedupFigures] = field(default_factory=list)
    image_inputs: ImageInputFigures | None = None
    machine: str = ""
    """How busy the host was when the run began: on a shared machine the figures vary."""

    @property
    def floor(self) -> float:
        """Images/s of the raw pipeline at its best batch size."""
        return self.batch_rates[best_batch_size(self.batch_rates)]

    def ratios(self) -> list[Ratio]:
        """Batched over per-image, service over floor, first image over whole request."""
        targets = TARGETS.get(self.preset, {})
        found: list[Ratio] = []
        batched = {size: rate for size, rate in self.batch_rates.items() if size > 1}
        if batched and 1 in self.batch_rates:
            value = batched[best_batch_size(batched)] / self.batch_rates[1]
            found.append(Ratio(BATCHED, value, targets.get(BATCHED)))
        for figures in self.service:
            name = f"service c{figures.concurrency} / floor"
            found.append(Ratio(name, figures.images_per_s / self.floor, targets.get(name)))
        for figures in self.service:
            name = f"{FIRST_IMAGE}, c{figures.concurrency}"
            value = figures.first_image_p50_s / figures.latency_p50_s
            found.append(Ratio(name, value, targets.get(name)))
        if self.sharing:
            shared, own = self.sharing.shared, self.sharing.own
            name = (
                f"{SHARED}, {self.sharing.images_per_request}-image requests c{shared.concurrency}"
            )
            found.append(Ratio(name, shared.images_per_s / own.images_per_s))
        if image := self.image_inputs:
            value = image.image_images_per_s / image.text_images_per_s
            name = f"{IMAGE_TO_IMAGE}, strength {image.strength:g}"
            found.append(Ratio(name, value, IMAGE_TO_IMAGE_TARGET))
        return found


@dataclass(frozen=True)
class Table:
    """Rows under headers; the first column is a label, the others are right-aligned numbers."""

    headers: list[str]
    rows: list[list[str]]

    def text(self) -> str:
        """Aligned plain-text columns."""
        widths = [
            max(len(row[i]) for row in [self.headers, *self.rows]) for i in range(len(self.headers))
        ]
        lines = []
        for row in [self.headers, *self.rows]:
            cells = [row[0].ljust(widths[0])] + [
                cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
            ]
            lines.append("  ".join(cells).rstrip())
        return "\n".join(lines)

    def markdown(self) -> str:
        """A GitHub-flavoured Markdown table."""
        rule = ["---"] + ["---:"] * (len(self.headers) - 1)
        return "\n".join(f"| {' | '.join(row)} |" for row in [self.headers, rule, *self.rows])


def replica_note(replicas: tuple[int | None, int | None]) -> str:
    """'2 worker replicas', or '1 -> 2 worker replicas' when the count changed while timing."""
    start, end = replicas
    if start is None or end is None:
        return ""
    counts = str(end) if start == end else f"{start} -> {end}"
    return f"{counts} worker replica{'' if counts == '1' else 's'}"


def _seconds(value: float) -> str:
    return f"{value:.2f} s"


def measurements_table(results: Results) -> Table:
    """One row per way of making the images."""
    best = best_batch_size(results.batch_rates)
    rows = []
    for size, rate in sorted(results.batch_rates.items()):
        notes = []
        if size == 1:
            notes.append("per-image loop, the original design")
        if size == best:
            notes.append("floor")
        label = f"raw pipeline, batch {size}" + (f" ({'; '.join(notes)})" if notes else "")
        rows.append([label, f"{rate:.2f}", "", "", "", ""])
    if image := results.image_inputs:
        steps = results.workload.steps
        both = [
            ("text-to-image", image.text_images_per_s),
            (
                f"image-to-image at strength {image.strength:g} "
                f"({image.steps_run} of {steps} steps)",
                image.image_images_per_s,
            ),
        ]
        for mode, rate in both:
            label = f"raw pipeline, batch {image.batch_size}, {mode}, in turns"
            rows.append([label, f"{rate:.2f}", "", "", "", ""])
    service = [
        (f"service, concurrency {figures.concurrency}", figures) for figures in results.service
    ]
    if sharing := results.sharing:
        requests = f"service, {sharing.images_per_request}-image requests"
        service += [
            (
                f"{requests}, concurrency {sharing.shared.concurrency}, batches shared",
                sharing.shared,
            ),
            (f"{requests}, concurrency {sharing.own.concurrency}, own batches", sharing.own),
        ]
    for label, figures in service:
        if replicas := replica_note(figures.worker_replicas):
            label += f" ({replicas})"
        rows.append(
            [
                label,
                f"{figures.images_per_s:.2f}",
                _seconds(figures.latency_p50_s),
                _seconds(figures.latency_p95_s),
                _seconds(figures.first_image_p50_s),
                _seconds(figures.first_image_p95_s),
            ]
        )
    headers = [
        "measurement",
        "images/s",
        "latency p50",
        "latency p95",
        "first image p50",
        "first image p95",
    ]
    return Table(headers, rows)


def ratios_table(results: Results) -> Table:
    """One row per ratio, with its target and verdict where the preset has one."""
    rows = [
        [ratio.name, f"{ratio.value:.3f}", str(ratio.target or ""), ratio.verdict]
        for ratio in results.ratios()
    ]
    return Table(["ratio", "value", "target", "verdict"], rows)


def speedups_table(results: Results) -> Table:
    """One row per set of speed-ups on the raw pipeline, against the plain one (the first)."""
    plain = results.speedups[0]
    rows = [
        [
            figures.name,
            f"{figures.image_latency_s * 1000:.0f} ms",
            f"{figures.images_per_s:.2f}",
            f"{figures.images_per_s / plain.images_per_s:.3f}",
            f"{figures.pixel_difference:.3f}",
            _seconds(figures.warmup_s),
        ]
        for figures in results.speedups
    ]
    batch = results.service_batch_size or best_batch_size(results.batch_rates)
    headers = [
        "speed-ups (raw pipeline)",
        "one image",
        f"images/s, batch {batch}",
        "vs none",
        "pixel difference",
        "warm-up",
    ]
    return Table(headers, rows)


def summary(results: Results) -> str:
    """What was measured, in one paragraph."""
    work = results.workload
    service_requests = ", ".join(
        f"{figures.requests} at concurrency {figures.concurrency}" for figures in results.service
    )
    return (
        f"Preset {results.preset}: {results.preset_description}. "
        f"{work.size}x{work.size}, {work.steps} steps, {work.sampler}, {work.images} images per "
        f"pipeline pass and per request, prompt {work.prompt!r}. "
        f"Images/s are medians of {results.repeats} repeats; latencies are percentiles over the "
        f"streamed requests ({service_requests or 'none'}); 'batched' is the best batch size "
        "above 1. "
        f"Raw pipeline on {results.pipeline_device}; the service's FLUX_SERVE_MAX_BATCH_SIZE is "
        f"{results.service_batch_size or 'as configured'}."
        + (
            " 'Batches shared' and 'own batches' are two deployments that differ only in "
            "FLUX_SERVE_BATCH_ACROSS_REQUESTS."
            if results.sharing
            else ""
        )
        + (
            " Speed-ups: 'one image' is the median latency of a batch of one; 'pixel difference' "
            "is the mean absolute difference from the plain pipeline's images, in 0..255 units; "
            "'warm-up' is the first call of each shape, where compiling happens."
            if results.speedups
            else ""
        )
        + (
            " 'In turns': text-to-image and image-to-image (from a "
            f"{work.size}x{work.size} input, whose VAE encoding it includes) timed alternately."
            if results.image_inputs
            else ""
        )
        + (f" Machine: {results.machine}." if results.machine else "")
    )


def tables(results: Results) -> list[Table]:
    """Every table of the report, in order."""
    found = [measurements_table(results), ratios_table(results)]
    if results.speedups:
        found.append(speedups_table(results))
    return found


def publish(text: str, markdown: str, path: Path | None) -> None:
    """Print a report, and write its Markdown to ``path`` if given."""
    print(text)
    if path is not None:
        path.write_text(markdown)


def to_text(results: Results) -> str:
    """The report for a terminal."""
    return "\n\n".join([summary(results), *(table.text() for table in tables(results))])


def to_markdown(results: Results) -> str:
    """The report as Markdown."""
    return "\n\n".join([summary(results), *(table.markdown() for table in tables(results))]) + "\n"
