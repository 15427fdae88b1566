"""Jobs benchmark: what the queue costs against /generate, and how long a cold start takes.

    bench/run.sh jobs --jobs 4      # in a loopback-only network namespace (as root)

1. N jobs submitted at once and N streamed /generate requests at once, the same images each, on
   the same service (the embedded tiny model, its own Ray instance and Redis): images/s of each,
   side by side (the target: jobs at 95 % of /generate or better), and the time from submission
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
from bench.stats import median
from bench.workload import Workload
from serve_app.models.tiny import TINY_CLIP_NAME, TINY_FLUX_NAME, ensure_tiny_model
from serve_app.settings import get_settings

_TIMEOUT = httpx.Timeout(600.0, connect=10.0)
# Polling a job costs the service a request: often enough to see the first image, rarely enough
# not to take the workers' CPU (a job's end comes from its own finished_at, not from the polls).
_POLL_S = 0.25


@dataclass(frozen=True)
class JobTiming:
    """One job: when its first image was stored and when it ended, from its submission."""

    first_image_s: float
    """As polled: to within _POLL_S."""
    latency_s: float
    """To the job's own finished_at (the service's clock, this machine's)."""
    images: int
    finished_at: float
    """The job's finished_at, in seconds since the epoch."""


async def timed_job(client: httpx.AsyncClient, body: dict[str, Any]) -> JobTiming:
    """Submit one job and poll it until it has succeeded."""
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
        await asyncio.sleep(_POLL_S)
    assert first_image_s is not None
    finished_at = datetime.fromisoformat(job["finished_at"]).timestamp()
    return JobTiming(first_image_s, finished_at - started, len(job["images"]), finished_at)


async def jobs_round(
    client: httpx.AsyncClient, body: dict[str, Any], jobs: int
) -> tuple[float, list[JobTiming]]:
    """``jobs`` jobs submitted at once: wall seconds to the last one's end, and their timings."""
    started = time.time()
    timings = await asyncio.gather(*(timed_job(client, body) for _ in range(jobs)))
    return max(timing.finished_at for timing in timings) - started, list(timings)


@dataclass(frozen=True)
class JobsFigures:
    """The benchmark's measurements (medians over repeats)."""

    jobs: int
    generate_images_per_s: float
    jobs_images_per_s: float
    first_image_s: float
    cold_first_image_s: float | None

    @property
    def ratio(self) -> float:
        """Jobs' images/s over /generate's at the same load."""
        return self.jobs_images_per_s / self.generate_images_per_s


def to_text(figures: JobsFigures) -> str:
    """The table and the ratio, with the target."""
    verdict = "met" if figures.ratio >= 0.95 else "not met"
    cold = (
        f"{figures.cold_first_image_s:.2f} s"
        if figures.cold_first_image_s is not None
        else "not measured"
    )
    return "\n".join(
        [
            f"{figures.jobs} at once, medians    images/s",
            f"  /generate (streamed)      {figures.generate_images_per_s:8.2f}",
            f"  /jobs                     {figures.jobs_images_per_s:8.2f}",
            f"jobs / generate: {figures.ratio:.3f} (target >= 0.95: {verdict})",
            f"job submission to first image (median, polled every {_POLL_S} s): "
            f"{figures.first_image_s:.2f} s",
            f"scale from zero, job submission to first image: {cold}",
        ]
    )


def _measure(url: str, workload: Workload, jobs: int, repeats: int) -> tuple[float, float, float]:
    async def run() -> tuple[float, float, float]:
        async with httpx.AsyncClient(base_url=url, timeout=_TIMEOUT, trust_env=False) as client:
            stream_body = workload.request_body(stream=True)
            job_body = workload.request_body(stream=False)
            await load_round(client, stream_body, jobs, 1)  # warm every path
            await jobs_round(client, job_body, jobs)
            generate_rates, job_rates, firsts = [], [], []
            for _ in range(repeats):
                wall_s, timings = await load_round(client, stream_body, jobs, 1)
                generate_rates.append(sum(t.images for t in timings) / wall_s)
                wall_s, job_timings = await jobs_round(client, job_body, jobs)
                job_rates.append(sum(t.images for t in job_timings) / wall_s)
                firsts.extend(t.first_image_s for t in job_timings)
            return median(generate_rates), median(job_rates), median(firsts)

    return asyncio.run(run())


def _cold_start(url: str, workload: Workload) -> float:
    async def run() -> float:
        async with httpx.AsyncClient(base_url=url, timeout=_TIMEOUT, trust_env=False) as client:
            return (await timed_job(client, workload.request_body(stream=False))).first_image_s

    return asyncio.run(run())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(prog="python -m bench.jobs", description=__doc__)
    parser.add_argument("--jobs", type=int, default=4, help="jobs (and requests) at once")
    parser.add_argument("--images", type=int, default=8, help="images per job")
    parser.add_argument("--size", type=int, default=128, help="image width and height")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds")
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
            generate_rate, jobs_rate, first = _measure(
                service.url, workload, args.jobs, args.repeats
            )
        cold = None
        if not args.no_cold_start:
            with running_service(replace(setup, worker_min_replicas=0)) as service:
                cold = _cold_start(service.url, workload)
    print(to_text(JobsFigures(args.jobs, generate_rate, jobs_rate, first, cold)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
