"""Jobs under faults, on the session's Ray Serve instance and its real Redis: cancellation of a
running job, a FluxWorker or the JobRunner killed mid-job, Redis down and up, and the whole
application stopped and started again with jobs queued and one running."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from deployments.local_cluster import deploy, wait_until_ready

from .conftest import ROOT, WEBHOOK_SECRET, ServeCluster
from .test_jobs_cluster import submit, wait_for_job
from .test_serve_faults import kill_a_replica
from .webhook_receiver import webhook_receiver

pytestmark = pytest.mark.ray

# Sixteen images of 128 px in four batches with 12 steps each: long enough to act mid-job.
LONG = {"prompt": "a red cat", "nof_images": 16, "width": 128, "height": 128,
        "diversity": {"nof_steps": [12]}}  # fmt: skip


def stored_files(cluster: ServeCluster, job_id: str) -> list[Path]:
    folder = cluster.storage_dir / job_id
    return sorted(folder.iterdir()) if folder.is_dir() else []


def assert_every_image_once(cluster: ServeCluster, job: dict[str, Any], count: int) -> None:
    assert job["status"] == "succeeded", job
    assert sorted(image["index"] for image in job["result"]["images"]) == list(range(count))
    assert len(stored_files(cluster, job["id"])) == count  # each image stored exactly once


def test_a_running_job_is_cancelled_keeps_the_images_it_stored_and_says_so(
    serve_cluster: ServeCluster,
) -> None:
    with webhook_receiver(WEBHOOK_SECRET) as receiver:
        job_id = submit(serve_cluster, {**LONG, "webhook": receiver.url})
        running = wait_for_job(serve_cluster.url, job_id, until="image")
        assert running["status"] == "running"
        cancelled = httpx.delete(f"{serve_cluster.url}/jobs/{job_id}", timeout=30)
        assert cancelled.status_code == 200
        assert cancelled.json()["status"] == "cancelled"
        # The runner sees it within a tick, stops the pipeline and announces the end.
        (announced,) = receiver.wait_for(1, timeout_s=60)
    job = httpx.get(f"{serve_cluster.url}/jobs/{job_id}", timeout=30).json()
    assert job["status"] == "cancelled"
    for part in ("id", "status", "progress", "images", "finished_at"):
        assert announced[part] == job[part], part
    assert 1 <= job["progress"]["done"] < 16
    # Nothing is made after the runner stopped (it announces only once it has).
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

    # As many two-batch jobs as the JobRunner runs at once (its max_ongoing_requests), and two
    # behind them that stay queued.
    running = [submit(serve_cluster, {**LONG, "nof_images": 8}) for _ in range(4)]
    queued = [submit(serve_cluster, {**LONG, "nof_images": 2}) for _ in range(2)]
    wait_for_job(serve_cluster.url, running[0], until="image")
    waiting = [
        httpx.get(f"{serve_cluster.url}/jobs/{job_id}", timeout=30).json() for job_id in queued
    ]
    assert "queued" in {job["status"] for job in waiting}
    serve.delete("flux")  # Redis stays up
    # Started again with a redelivery timeout far beyond the waits below: a job that was not
    # handed back at the stop, and waited to be delivered again, would not end in time.
    config = yaml.safe_load(serve_cluster.config_path.read_text())
    config["applications"][0]["runtime_env"]["env_vars"]["FLUX_SERVE_JOBS_REDELIVERY_S"] = "600"
    restarted = serve_cluster.config_path.with_name("serve-restarted.yaml")
    restarted.write_text(yaml.safe_dump(config))
    deploy(restarted, serve_cluster.gcs_address, ROOT)  # the real serve run
    wait_until_ready(serve_cluster.url, timeout_s=240)
    for job_id, count in [(job_id, 8) for job_id in running] + [(job_id, 2) for job_id in queued]:
        job = wait_for_job(serve_cluster.url, job_id, timeout_s=100)
        assert_every_image_once(serve_cluster, job, count)
