"""Jobs on the real Ray Serve instance and the real Redis: config/serve.yaml's application."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from .conftest import WEBHOOK_SECRET, ServeCluster
from .webhook_receiver import webhook_receiver

pytestmark = pytest.mark.ray


def wait_for_job(
    url: str, job_id: str, timeout_s: float = 180, until: str = "end"
) -> dict[str, Any]:
    """Poll the job until it has ended (or, with until='image', has an image stored)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/jobs/{job_id}", timeout=30).json()
        if until == "image" and job["progress"]["done"] > 0:
            return job
        if job["status"] in {"succeeded", "failed", "cancelled"}:
            return job
        time.sleep(0.25)
    raise TimeoutError(f"job {job_id} did not end: {job}")


def test_a_job_succeeds_with_every_image_and_a_signed_webhook(serve_cluster: ServeCluster) -> None:
    with webhook_receiver(WEBHOOK_SECRET) as receiver:
        payload = {"prompt": "a red cat", "nof_images": 4, "width": 64, "height": 64}
        response = httpx.post(
            f"{serve_cluster.url}/jobs", json={**payload, "webhook": receiver.url}, timeout=30
        )
        assert response.status_code == 202, response.text
        submitted = response.json()
        assert submitted["status"] in {"queued", "running"}
        job = wait_for_job(serve_cluster.url, submitted["id"])
        assert job["status"] == "succeeded", job
        assert job["progress"] == {"done": 4, "total": 4}
        assert sorted(image["index"] for image in job["images"]) == [0, 1, 2, 3]
        assert job["result"]["count"] == 4
        (delivered,) = receiver.wait_for(1, timeout_s=60)
    assert delivered["id"] == job["id"]
    assert delivered["status"] == "succeeded"
    assert delivered["images"] == job["images"]
    for image in job["images"]:
        assert httpx.get(image["url"], timeout=30).status_code == 200


def worker_replicas(app_name: str) -> int:
    from ray import serve

    workers = serve.status().applications[app_name].deployments["FluxWorker"]
    return sum(n for state, n in workers.replica_states.items() if state == "RUNNING")


def test_generate_at_zero_workers_waits_for_the_cold_start(serve_cluster: ServeCluster) -> None:
    """As production runs it when idle: FluxWorker at 0 replicas; a request starts one."""
    import os

    from ray import serve

    from deployments.flux_worker import FluxWorker
    from deployments.ingress import Ingress
    from deployments.scorer import Scorer

    env = {
        "FLUX_SERVE_CACHE_DIR": os.environ["FLUX_SERVE_CACHE_DIR"],
        "FLUX_SERVE_STORAGE_DIR": str(serve_cluster.storage_dir),
        "FLUX_SERVE_REDIS_URL": serve_cluster.redis.url,
    }
    options = {"num_cpus": 0.25, "num_gpus": 0, "runtime_env": {"env_vars": env}}
    scaling = {"min_replicas": 0, "initial_replicas": 0, "max_replicas": 1, "upscale_delay_s": 0}
    worker = FluxWorker.options(autoscaling_config=scaling, ray_actor_options=options)
    app = Ingress.options(ray_actor_options=options).bind(
        worker.bind(), Scorer.options(ray_actor_options=options).bind(), []
    )
    serve.run(app, name="zero", route_prefix="/zero")
    try:
        assert worker_replicas("zero") == 0
        payload = {"prompt": "a red cat", "nof_images": 2, "width": 64, "height": 64}
        response = httpx.post(f"{serve_cluster.url}/zero/generate", json=payload, timeout=300)
        assert response.status_code == 200, response.text
        assert response.json()["count"] == 2
        assert worker_replicas("zero") == 1
    finally:
        serve.delete("zero")
