"""Jobs benchmark: what the queue costs against /generate, and how long a cold start takes.

    bench/run.sh jobs --jobs 4      # in a loopback-only network namespace (as root)

1. N jobs submitted at once and N streamed /generate requests at once, the same images each, on
   the same service (the embedded tiny model, its own Ray instance and Redis): images/s of each,
   in pairs of rounds side by side, the order alternating (this machine's speed drifts by tens of
   percent from one round to the next); the ratio is the median of the pairs' (the target: jobs
   at 95 % of /generate or better). Then rounds of jobs polled often: the time from submission
   to a job's first stored image;
2. the same service deployed with FluxWorker at 0 replicas: the time from submitting one job to
   its first image, the replica's start included.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import httpx

from bench.cluster import ServiceSetup, private_redis, running_service
from bench.service_timing import ServiceError, load_round
from bench.stats import median, percentile
from bench.workload import Workload
from serve_app.models.tiny import TINY_CLIP_NAME, TINY_FLUX_NAME, ensure_tiny_model
from serve_app.settings import get_settings

_TIMEOUT = httpx.Timeout(600.0, connect=10.0)
# Polling a job costs the service a request, which on a CPU machine takes from the workers' CPU:
# the throughput rounds poll rarely (a job's end comes from its own finished_at, not from the
# polls), the first-image rounds often (to within their period).
_THROUGHPUT_POLL_S = 1.0
_FIRST_IMAGE_POLL_S = 0.25
_FIRST_IMAGE_ROUNDS = 2
# A job that has not ended by then never will: the run fails instead of waiting for ever.
_JOB_DEADLINE_S = 600.0


@dataclass(frozen=True)
class JobTiming:
    """One job: when its first image was stored and when it ended, from its submission."""

    first_image_s: float
    """As polled: to within the polling period."""
    latency_s: float
    """To the job's own finished_at (the service's clock, this machine's)."""
    images: int
    finished_at: float
    """The job's finished_at, in seconds since the epoch."""


async def timed_job(client: httpx.AsyncClient, body: dict[str, Any], poll_s: float) -> JobTiming:
    """Submit one job and poll it every ``poll_s`` until it has succeeded."""
    started = time.time()
    submitted = await client.post("/jobs", json=body)
    if submitted.status_code != 202:
        raise ServiceError(f"POST /jobs answered {submitted.status_code}: {submitted.text}")
    job_id = submitted.json()["id"]
    first_image_s: float | None = None
    while True:
        job = (await client.get(f"/jobs/{job_id}")).json()
        if first_image_s is None and job["progress"]["done"]:
            first_image_s = time.time() - started
        if job["status"] == "succeeded":
            break
        if job["status"] in {"failed", "cancelled"}:
            raise ServiceError(f"job {job_id} {job['status']}: {job['error']}")
        if time.time() - started > _JOB_DEADLINE_S:
            raise ServiceError(f"job {job_id} still {job['status']} after {_JOB_DEADLINE_S} s")
        await asyncio.sleep(poll_s)
    assert first_image_s is not None
    finished_at = datetime.fromisoformat(job["finished_at"]).timestamp()
    return JobTiming(first_image_s, finished_at - started, len(job["images"]), finished_at)


async def jobs_round(
    client: httpx.AsyncClient, body: dict[str, Any], jobs: int, poll_s: float
) -> tuple[float, list[JobTiming]]:
    """``jobs`` jobs submitted at once: wall seconds to the last one's end, and their timings."""
    started = time.time()
    timings = await asyncio.gather(*(timed_job(client, body, poll_s) for _ in range(jobs)))
    return max(timing.finished_at for timing in timings) - started, list(timings)


@dataclass(frozen=True)
class JobsFigures:
    """The benchmark's measurements (medians over the rounds)."""

    jobs: int
    generate_images_per_s: float
    jobs_images_per_s: float
    ratio: float
    """Jobs' images/s over /generate's at the same load: the median of the pairs of rounds."""
    pairs: int
    ratio_quartiles: tuple[float, float]
    """The pairs' ratios at the first and third quartiles: how much one pair says."""
    first_image_s: float
    cold_first_image_s: float | None


def to_text(figures: JobsFigures) -> str:
    """The table and the ratio, with the target."""
    verdict = "met" if figures.ratio >= 0.95 else "not met"
    low, high = figures.ratio_quartiles
    cold = (
        f"{figures.cold_first_image_s:.2f} s"
        if figures.cold_first_image_s is not None
        else "not measured"
    )
    return "\n".join(
        [
            f"{figures.jobs} at once, medians of {figures.pairs} rounds    images/s",
            f"  /generate (streamed)      {figures.generate_images_per_s:8.2f}",
            f"  /jobs                     {figures.jobs_images_per_s:8.2f}",
            f"jobs / generate (median of the pairs of rounds): {figures.ratio:.3f} "
            f"(target >= 0.95: {verdict}; quartiles of the pairs {low:.3f} to {high:.3f})",
            f"job submission to first image (median, polled every {_FIRST_IMAGE_POLL_S} s): "
            f"{figures.first_image_s:.2f} s",
            f"scale from zero, job submission to first image: {cold}",
        ]
    )


@dataclass(frozen=True)
class Rounds:
    """What the timed rounds measured: images/s of each, pair by pair, and first images."""

    generate_rates: list[float]
    job_rates: list[float]
    first_images: list[float]


def _measure(url: str, workload: Workload, jobs: int, pairs: int) -> Rounds:
    async def run() -> Rounds:
        async with httpx.AsyncClient(base_url=url, timeout=_TIMEOUT, trust_env=False) as client:
            stream_body = workload.request_body(stream=True)
            job_body = workload.request_body(stream=False)

            async def generate_rate() -> float:
                wall_s, timings = await load_round(client, stream_body, jobs, 1)
                return sum(t.images for t in timings) / wall_s

            async def jobs_rate() -> float:
                wall_s, timings = await jobs_round(client, job_body, jobs, _THROUGHPUT_POLL_S)
                return sum(t.images for t in timings) / wall_s

            await generate_rate()  # warm every path
            await jobs_rate()
            rounds = Rounds([], [], [])
            for pair in range(pairs):
                # Alternating which goes first evens out a machine that speeds up or slows down.
                if pair % 2 == 0:
                    rounds.generate_rates.append(await generate_rate())
                    rounds.job_rates.append(await jobs_rate())
                else:
                    rounds.job_rates.append(await jobs_rate())
                    rounds.generate_rates.append(await generate_rate())
            for _ in range(_FIRST_IMAGE_ROUNDS):
                _, timings = await jobs_round(client, job_body, jobs, _FIRST_IMAGE_POLL_S)
                rounds.first_images.extend(t.first_image_s for t in timings)
            return rounds

    return asyncio.run(run())


def figures_of(jobs: int, rounds: Rounds, cold_first_image_s: float | None) -> JobsFigures:
    """The medians of the rounds, the ratio paired round by round."""
    ratios = [
        job_rate / generate_rate
        for job_rate, generate_rate in zip(rounds.job_rates, rounds.generate_rates, strict=True)
    ]
    return JobsFigures(
        jobs=jobs,
        generate_images_per_s=median(rounds.generate_rates),
        jobs_images_per_s=median(rounds.job_rates),
        ratio=median(ratios),
        pairs=len(ratios),
        ratio_quartiles=(percentile(ratios, 0.25), percentile(ratios, 0.75)),
        first_image_s=median(rounds.first_images),
        cold_first_image_s=cold_first_image_s,
    )


def _cold_start(url: str, workload: Workload) -> float:
    async def run() -> float:
        async with httpx.AsyncClient(base_url=url, timeout=_TIMEOUT, trust_env=False) as client:
            body = workload.request_body(stream=False)
            return (await timed_job(client, body, _FIRST_IMAGE_POLL_S)).first_image_s

    return asyncio.run(run())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(prog="python -m bench.jobs", description=__doc__)
    parser.add_argument("--jobs", type=int, default=4, help="jobs (and requests) at once")
    # The service's own default request: 16 images (the API's default) at 256x256 (the embedded
    # default's size). Rounds of about a second (--images 8 --size 128) put each job's fixed
    # start, some 50 ms here, at 5 % of the round.
    parser.add_argument("--images", type=int, default=16, help="images per job")
    parser.add_argument("--size", type=int, default=256, help="image width and height")
    parser.add_argument(
        "--pairs", type=int, default=15, help="timed pairs of rounds (/generate and /jobs)"
    )
    parser.add_argument("--no-cold-start", action="store_true", help="skip the scale from zero")
    args = parser.parse_args(argv)
    cache_dir = get_settings().cache_dir
    model = ensure_tiny_model(TINY_FLUX_NAME, cache_dir)
    ensure_tiny_model(TINY_CLIP_NAME, cache_dir)
    workload = Workload(prompt="a red cat", images=args.images, size=args.size, steps=4)
    with private_redis() as redis_url:
        setup = ServiceSetup(
            model=model,
            cache_dir=cache_dir,
            size=args.size,
            max_batch_size=4,
            ray_cpus=8,
            gpus=0,
            redis_url=redis_url,
        )
        with running_service(setup) as service:
            rounds = _measure(service.url, workload, args.jobs, args.pairs)
        cold = None
        if not args.no_cold_start:
            with running_service(replace(setup, worker_min_replicas=0)) as service:
                cold = _cold_start(service.url, workload)
    print(to_text(figures_of(args.jobs, rounds, cold)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
