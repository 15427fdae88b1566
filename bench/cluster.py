"""A private Ray instance serving config/serve.yaml, as the integration tests start it.

The Serve config is the shipped one with only the settings a benchmark run needs changed (model,
image size, batch size, a private image store and a free port), deployed with the real
``serve run`` command, and torn down even when the run fails.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

from deployments.local_cluster import deploy, free_port, wait_until_ready
from deployments.local_redis import server_command, wait_until_up

ROOT = Path(__file__).resolve().parents[1]
WORKER_DEPLOYMENT = "FluxWorker"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceSetup:
    """What the benchmark changes in config/serve.yaml, and the Ray instance it runs on."""

    model: Path
    cache_dir: Path
    size: int
    max_batch_size: int
    ray_cpus: int
    gpus: int
    batch_across_requests: bool = True
    lora_dir: Path | None = None
    """The adapter library (FLUX_SERVE_LORA_DIR); unset: as shipped."""
    ready_timeout_s: float = 600.0
    redis_url: str | None = None
    """The jobs' Redis (FLUX_SERVE_REDIS_URL and FluxWorker's policy); None: as shipped."""
    worker_min_replicas: int | None = None
    """FluxWorker's min_replicas, starting there too (0: scale from zero); None: as shipped."""


@dataclass(frozen=True)
class RunningService:
    """The deployed application: its base URL and the Serve application's name."""

    url: str
    app_name: str

    def _workers(self) -> Any:
        from ray import serve

        application = serve.status().applications.get(self.app_name)
        if application is None:
            return None
        return application.deployments.get(WORKER_DEPLOYMENT)

    def worker_replicas(self) -> int | None:
        """How many FluxWorker replicas are running now (None: the deployment is not there)."""
        workers = self._workers()
        if workers is None:
            return None
        states: dict[str, int] = workers.replica_states
        return sum(count for state, count in states.items() if state == "RUNNING")

    def wait_while_scaling(self, timeout_s: float) -> None:
        """Return once Serve is neither adding nor removing FluxWorker replicas (or at timeout)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            workers = self._workers()
            if workers is None or workers.status.value not in {"UPSCALING", "DOWNSCALING"}:
                return
            time.sleep(0.5)


def serve_config(setup: ServiceSetup, http_port: int, storage_dir: Path) -> dict[str, Any]:
    """config/serve.yaml with the benchmark's model, size, batch sizes, store and port."""
    config: dict[str, Any] = yaml.safe_load((ROOT / "config" / "serve.yaml").read_text())
    config["http_options"]["host"] = "127.0.0.1"
    config["http_options"]["port"] = http_port
    application = config["applications"][0]
    application["runtime_env"]["env_vars"].update(
        {
            "FLUX_SERVE_MODEL": str(setup.model),
            "FLUX_SERVE_CACHE_DIR": str(setup.cache_dir),
            "FLUX_SERVE_DEFAULT_WIDTH": str(setup.size),
            "FLUX_SERVE_DEFAULT_HEIGHT": str(setup.size),
            "FLUX_SERVE_MAX_BATCH_SIZE": str(setup.max_batch_size),
            "FLUX_SERVE_BATCH_ACROSS_REQUESTS": str(setup.batch_across_requests).lower(),
            "FLUX_SERVE_STORAGE_DIR": str(storage_dir),
        }
    )
    for deployment in application["deployments"]:
        autoscaling = deployment.get("autoscaling_config") or {}
        if setup.redis_url and "policy" in autoscaling:
            autoscaling["policy"]["policy_kwargs"]["broker_url"] = setup.redis_url
        if deployment["name"] == WORKER_DEPLOYMENT and setup.worker_min_replicas is not None:
            autoscaling["min_replicas"] = autoscaling["initial_replicas"] = (
                setup.worker_min_replicas
            )
    if setup.redis_url:
        application["runtime_env"]["env_vars"]["FLUX_SERVE_REDIS_URL"] = setup.redis_url
    if setup.lora_dir is not None:
        application["runtime_env"]["env_vars"]["FLUX_SERVE_LORA_DIR"] = str(setup.lora_dir)
    if setup.gpus:
        # As README.md's "Real weights" says: one GPU per worker, as many workers as GPUs.
        for deployment in application["deployments"]:
            if deployment["name"] == WORKER_DEPLOYMENT:
                deployment.setdefault("ray_actor_options", {})["num_gpus"] = 1
                autoscaling = deployment.get("autoscaling_config")
                if autoscaling:
                    autoscaling["max_replicas"] = min(autoscaling["max_replicas"], setup.gpus)
    return config


@contextmanager
def private_redis() -> Iterator[str]:
    """A Redis of the benchmark's own on a free port, for the jobs broker that the shipped
    config's application needs to be ready: its URL, until the block ends."""
    with tempfile.TemporaryDirectory(prefix="flux-bench-redis-") as folder:
        port = free_port()
        redis = subprocess.Popen(server_command(Path(folder), port, daemonize=False))
        try:
            wait_until_up(port, Path(folder) / "redis.log")
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            redis.terminate()
            redis.wait(timeout=30)


@contextmanager
def running_service(setup: ServiceSetup) -> Iterator[RunningService]:
    """Start Ray, deploy the modified config with ``serve run``, and tear everything down."""
    import ray
    from ray import serve

    # Ray 2.60 turns on token auth after a first local start; the benchmark sends no usage stats.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory(prefix="flux-bench-") as work:
        port = free_port()
        config = serve_config(setup, port, Path(work) / "images")
        config_path = Path(work) / "serve.yaml"
        config_path.write_text(yaml.safe_dump(config))
        # A fresh instance at an explicit address: never a stale /tmp/ray/ray_current_cluster.
        context = ray.init(
            address="local",
            num_cpus=setup.ray_cpus,
            num_gpus=setup.gpus,
            include_dashboard=False,
            log_to_driver=False,
        )
        try:
            deploy(config_path, context.address_info["gcs_address"], ROOT)
            url = f"http://127.0.0.1:{port}"
            logger.info("waiting for %s/healthz", url)
            wait_until_ready(url, setup.ready_timeout_s)
            yield RunningService(url=url, app_name=config["applications"][0]["name"])
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
