"""Jobs on the real Ray Serve instance and the real Redis: config/serve.yaml's application."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest
import redis

from .conftest import WEBHOOK_SECRET, ServeCluster
from .test_serve_cluster import metric_samples
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
    # The job store holds the job's state and result: Celery stores no result of its own for the
    # run or the delivery (it would before it acknowledges each, when kombu drops the task's
    # unacked entry, which names the job).
    broker = redis.Redis.from_url(serve_cluster.redis.url, decode_responses=True)
    deadline = time.monotonic() + 30
    while any(job["id"] in task for task in broker.hvals("unacked")):
        assert time.monotonic() < deadline, "the job's tasks were not acknowledged"
        time.sleep(0.25)
    assert not broker.keys("celery-task-meta-*")


SMALL = {"prompt": "a red cat", "nof_images": 2, "width": 64, "height": 64}


def submit(cluster: ServeCluster, body: dict[str, Any]) -> str:
    response = httpx.post(f"{cluster.url}/jobs", json=body, timeout=30)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def metric(cluster: ServeCluster, name: str) -> dict[str, float]:
    """The samples of one metric on the cluster's Prometheus endpoint, by label text."""
    return metric_samples(httpx.get(cluster.metrics_url, timeout=10).text, name)


def grown(before: dict[str, float], after: dict[str, float], label: str) -> float:
    """How much the samples whose labels contain ``label`` grew (a replica's new series whole)."""
    return sum(value - before.get(key, 0.0) for key, value in after.items() if label in key)


def wait_for_metric(
    cluster: ServeCluster, name: str, label: str, before: dict[str, float], by: float = 1
) -> None:
    """Poll Ray's metrics endpoint until ``name``{``label``} has grown by ``by``."""
    deadline = time.monotonic() + 60
    while grown(before, metric(cluster, name), label) < by:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}{{{label}}} did not grow by {by}")
        time.sleep(1)


def test_a_refused_webhook_is_retried_with_backoff_a_bounded_number_of_times_off_the_gpus(
    serve_cluster: ServeCluster,
) -> None:
    deliveries = "ray_flux_webhook_deliveries_total"
    before = metric(serve_cluster, deliveries)
    release = threading.Event()
    with (
        webhook_receiver(WEBHOOK_SECRET, refuse_first=2, hold_first=release) as patient,
        webhook_receiver(WEBHOOK_SECRET, refuse_first=1000) as closed,
    ):
        first = submit(serve_cluster, {**SMALL, "webhook": patient.url})
        refused = submit(serve_cluster, {**SMALL, "webhook": closed.url})
        assert wait_for_job(serve_cluster.url, first)["status"] == "succeeded"
        patient.wait_for_attempts(1, timeout_s=60)
        # While its receiver holds that delivery open, the job has ended and the next one runs.
        assert wait_for_job(serve_cluster.url, submit(serve_cluster, SMALL))["status"] == (
            "succeeded"
        )
        assert (len(patient.attempts), patient.verified) == (1, [])
        release.set()
        (delivered,) = patient.wait_for(1, timeout_s=120)
        assert (delivered["id"], delivered["status"]) == (first, "succeeded")
        assert patient.refused == 2
        assert {message_id for _, message_id in patient.attempts} == {f"msg_{first}"}
        # Never delivered: given up after FLUX_SERVE_WEBHOOK_MAX_ATTEMPTS (3 here) attempts.
        wait_for_metric(serve_cluster, deliveries, 'outcome="failed"', before)
        arrivals = [at for at, _ in closed.attempts]
        assert len(arrivals) == 3
        assert {message_id for _, message_id in closed.attempts} == {f"msg_{refused}"}
        # FLUX_SERVE_WEBHOOK_BACKOFF_S (1 s here), doubling: at least 1 s, then at least 2 s.
        assert arrivals[1] - arrivals[0] >= 0.9
        assert arrivals[2] - arrivals[1] >= 1.8
        time.sleep(max(0.0, arrivals[2] + 6 - time.monotonic()))  # past a fourth attempt's time
        assert len(closed.attempts) == 3
    after = metric(serve_cluster, deliveries)
    assert grown(before, after, 'outcome="delivered"') >= 1
    assert grown(before, after, 'outcome="retrying"') >= 4


def test_the_jobs_metrics_reach_prometheus(serve_cluster: ServeCluster) -> None:
    names = [
        "ray_flux_jobs_finished_total",
        "ray_flux_job_queued_seconds_count",
        "ray_flux_jobs_queue_depth",
    ]
    before = {name: metric(serve_cluster, name) for name in names}
    succeeded = submit(serve_cluster, SMALL)
    cancelled = submit(serve_cluster, {**SMALL, "nof_images": 16, "width": 128, "height": 128})
    assert httpx.delete(f"{serve_cluster.url}/jobs/{cancelled}", timeout=30).status_code == 200
    assert wait_for_job(serve_cluster.url, succeeded)["status"] == "succeeded"
    finished = names[0]
    wait_for_metric(serve_cluster, finished, 'outcome="succeeded"', before[finished])
    wait_for_metric(serve_cluster, finished, 'outcome="cancelled"', before[finished])
    # Time queued: observed when a job leaves the queue (a job cancelled while queued never does).
    wait_for_metric(serve_cluster, names[1], "", before[names[1]])
    # A gauge the runners set every few seconds: it reaches the endpoint at the next export.
    deadline = time.monotonic() + 60
    while not (depth := metric(serve_cluster, names[2])) and time.monotonic() < deadline:
        time.sleep(1)
    assert depth, "no queue depth reported"
    assert all(value >= 0 for value in depth.values())


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
