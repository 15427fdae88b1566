"""How many threads torch computes on in a worker replica.

Ray sets ``OMP_NUM_THREADS`` to a replica's whole CPUs, at least one: a FluxWorker with
``num_cpus: 0.5`` computes on one thread, so on a CPU host one request uses one core however many
there are. Worker replicas on one host share its cores, and a replica that works alone should have
them all: by default each takes every core the process may use. Threads that wait then must not
spin on cores another replica computes on, which is why config/serve.yaml sets
``OMP_WAIT_POLICY=PASSIVE`` (read by OpenMP when torch loads, so it can't be set from here).
On a GPU the CPU threads barely matter: torch keeps its own choice unless the setting names one.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from serve_app.settings import ServiceSettings

logger = logging.getLogger(__name__)

_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cores(cpu_max: Path = _CGROUP_CPU_MAX) -> int:
    """Cores this process may compute on: its CPU affinity, capped by the CPU quota of its
    cgroup (a container's CPU limit), at least one."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()
    except (OSError, ValueError):
        return cores
    if quota == "max":
        return cores
    return max(1, min(cores, math.ceil(int(quota) / int(period))))


def torch_threads(settings: ServiceSettings, device: torch.device) -> int | None:
    """The thread count a replica on ``device`` should use; None: leave torch's own."""
    if settings.torch_threads is not None:
        return settings.torch_threads
    if device.type == "cpu":
        return available_cores()
    return None


def apply_torch_threads(settings: ServiceSettings, device: torch.device) -> None:
    """Set torch's thread count for a replica computing on ``device``, and log it."""
    threads = torch_threads(settings, device)
    if threads is not None:
        torch.set_num_threads(threads)
    source = "FLUX_SERVE_TORCH_THREADS" if settings.torch_threads is not None else "default"
    logger.info(
        "torch computes on %d threads (%s; OMP_WAIT_POLICY=%s)",
        torch.get_num_threads(),
        source,
        os.environ.get("OMP_WAIT_POLICY", "unset"),
    )
