"""What the tests measure of a running cluster: the service's metrics on a Ray node's
Prometheus endpoint, and the memory of the processes the test session started."""

from __future__ import annotations

import contextlib

import httpx
import psutil


def images_by_replica(metrics_url: str, application: str) -> dict[str, float]:
    """Images generated so far by each FluxWorker replica of ``application`` that reports to
    this endpoint (each Ray node exports the metrics of its own processes)."""
    counts: dict[str, float] = {}
    for line in httpx.get(metrics_url, timeout=10).text.splitlines():
        if (
            line.startswith("ray_flux_images_generated_total{")
            and f'application="{application}"' in line
        ):
            labels, _, value = line.rpartition(" ")
            replica = labels.split('replica="', 1)[1].split('"', 1)[0]
            counts[replica] = counts.get(replica, 0.0) + float(value)
    return counts


def memory_by_process() -> dict[int, int]:
    """RSS of every process this test session started (Ray's included), by pid, in bytes."""
    sizes = {}
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            # A replica still loading its model is growing by design, and an idle worker of Ray's
            # pool may become one (autoscaling): neither is a settled process.
            name = process.name()
            if "initialize" not in name and "IDLE" not in name:
                sizes[process.pid] = process.memory_info().rss
    return sizes


def growth(settled: dict[int, int], before: dict[int, int], after: dict[int, int]) -> int:
    """How much the processes that were already running at ``settled`` grew from ``before`` to
    ``after``: replicas that autoscaling adds meanwhile load their models, which is not growth."""
    common = settled.keys() & before.keys() & after.keys()
    return sum(after[pid] - before[pid] for pid in common)
