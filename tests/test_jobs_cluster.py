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
