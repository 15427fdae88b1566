"""Jobs under faults, on the session's Ray Serve instance and its real Redis: cancellation of a
running job, a FluxWorker or the JobRunner killed mid-job, Redis down and up, and the whole
application stopped and started again with jobs queued and one running."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments.local_cluster import deploy, wait_until_ready

from .conftest import ROOT, ServeCluster
from .test_jobs_cluster import wait_for_job
from .test_serve_faults import kill_a_replica

pytestmark = pytest.mark.ray

# Sixteen images of 128 px in four batches with 12 steps each: long enough to act mid-job.
LONG = {"prompt": "a red cat", "nof_images": 16, "width": 128, "height": 128,
        "diversity": {"nof_steps": [12]}}  # fmt: skip


def submit(cluster: ServeCluster, body: dict[str, Any]) -> str:
    response = httpx.post(f"{cluster.url}/jobs", json=body, timeout=30)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def stored_files(cluster: ServeCluster, job_id: str) -> list[Path]:
    folder = cluster.storage_dir / job_id
    return sorted(folder.iterdir()) if folder.is_dir() else []


def assert_every_image_once(cluster: ServeCluster, job: dict[str, Any], count: int) -> None:
    assert job["status"] == "succeeded", job
    assert sorted(image["index"] for image in job["result"]["images"]) == list(range(count))
    assert len(stored_files(cluster, job["id"])) == count  # each image stored exactly once


def test_a_running_job_is_cancelled_and_keeps_the_images_it_stored(
    serve_cluster: ServeCluster,
) -> None:
    job_id = submit(serve_cluster, LONG)
    running = wait_for_job(serve_cluster.url, job_id, until="image")
    assert running["status"] == "running"
    cancelled = httpx.delete(f"{serve_cluster.url}/jobs/{job_id}", timeout=30)
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    # The runner sees it within a tick and stops the pipeline; nothing more is made.
    time.sleep(5)
    job = httpx.get(f"{serve_cluster.url}/jobs/{job_id}", timeout=30).json()
    assert job["status"] == "cancelled"
    assert 1 <= job["progress"]["done"] < 16
    assert len(stored_files(serve_cluster, job_id)) == job["progress"]["done"]
    assert httpx.delete(f"{serve_cluster.url}/jobs/{job_id}", timeout=30).status_code == 409


@pytest.mark.parametrize("deployment", ["FluxWorker", "JobRunner"])
def test_a_replica_killed_mid_job_loses_no_image(
    serve_cluster: ServeCluster, deployment: str
) -> None:
    job_id = submit(serve_cluster, LONG)
    wait_for_job(serve_cluster.url, job_id, until="image")
    kill_a_replica(deployment, application="flux")
    job = wait_for_job(serve_cluster.url, job_id, timeout_s=300)
    assert_every_image_once(serve_cluster, job, 16)


def test_with_redis_down_jobs_are_a_503_and_flow_again_once_it_is_back(
    serve_cluster: ServeCluster,
) -> None:
    small = {"prompt": "a red cat", "nof_images": 2, "width": 64, "height": 64}
    serve_cluster.redis.kill()
    try:
        refused = httpx.post(f"{serve_cluster.url}/jobs", json=small, timeout=60)
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "broker_unavailable"
        assert "Redis" in refused.json()["error"]["message"]
        assert (
            httpx.post(f"{serve_cluster.url}/generate", json=small, timeout=120).status_code == 200
        )
        health = httpx.get(f"{serve_cluster.url}/healthz", timeout=30)
        assert health.status_code == 503
        assert "jobs" in health.json()["detail"]
    finally:
        serve_cluster.redis.start()  # the same port and data
    job = wait_for_job(serve_cluster.url, submit(serve_cluster, small), timeout_s=240)
    assert_every_image_once(serve_cluster, job, 2)


def test_jobs_queued_and_running_survive_a_restart_of_the_application(
    serve_cluster: ServeCluster,
) -> None:
    from ray import serve

    running = submit(serve_cluster, LONG)
    queued = [submit(serve_cluster, {**LONG, "nof_images": 4}) for _ in range(5)]
    wait_for_job(serve_cluster.url, running, until="image")
    serve.delete("flux")  # Redis stays up
    deploy(serve_cluster.config_path, serve_cluster.gcs_address, ROOT)  # the real serve run
    wait_until_ready(serve_cluster.url, timeout_s=240)
    for job_id, count in [(running, 16)] + [(job_id, 4) for job_id in queued]:
        job = wait_for_job(serve_cluster.url, job_id, timeout_s=300)
        assert_every_image_once(serve_cluster, job, count)
