"""LoRA adapters on the real Ray Serve instance: through the proxy, refused by a worker across Ray,
and routed to the replica that holds them."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import httpx
import pytest

from .conftest import ServeCluster, extra_application
from .loras import ATTENTION, MISFIT, MLP, mixed_library

pytestmark = pytest.mark.ray

SMALL = {"prompt": "a red cat", "nof_images": 1, "width": 64, "height": 64}


def test_the_embedded_library_is_served_through_the_proxy(serve_cluster: ServeCluster) -> None:
    listing = httpx.get(f"{serve_cluster.url}/loras", timeout=30).json()
    digests = {item["name"]: item["digest"] for item in listing["loras"]}
    assert {ATTENTION, MLP} <= set(digests)
    response = httpx.post(
        f"{serve_cluster.url}/generate",
        json={**SMALL, "nof_images": 2, "loras": [{"name": ATTENTION, "scale": 0.5}]},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    for image in response.json()["images"]:
        assert image["sampling_params"]["loras"] == [
            {"name": ATTENTION, "scale": 0.5, "digest": digests[ATTENTION]}
        ]


@pytest.fixture(scope="module")
def lora_app(
    serve_cluster: ServeCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """An application on a library with a misfit, and two workers that each keep one adapter."""
    from serve_app.settings import get_settings

    work = tmp_path_factory.mktemp("lora-app")
    env = {
        "FLUX_SERVE_CACHE_DIR": os.environ["FLUX_SERVE_CACHE_DIR"],
        "FLUX_SERVE_STORAGE_DIR": str(work / "images"),
        "FLUX_SERVE_LORA_DIR": str(mixed_library(get_settings(), work / "library")),
        "FLUX_SERVE_MAX_LORAS": "1",
        "FLUX_SERVE_LORA_CACHE_SIZE": "1",
        "FLUX_SERVE_REDIS_URL": serve_cluster.redis.url,
    }
    with extra_application("loras", env) as prefix:
        yield f"{serve_cluster.url}{prefix}"


def test_a_misfit_refused_by_a_worker_is_a_422_across_ray(lora_app: str) -> None:
    response = httpx.post(
        f"{lora_app}/generate", json={**SMALL, "loras": [{"name": MISFIT}]}, timeout=120
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "loras.0.name"
    assert error["message"].startswith(f"adapter {MISFIT!r} does not fit the served model")
    fine = httpx.post(f"{lora_app}/generate", json={**SMALL, "loras": [{"name": MLP}]}, timeout=120)
    assert fine.status_code == 200, fine.text


def adapter_hits(metrics_url: str) -> float:
    """Adapter cache hits so far on the FluxWorkers of the lora application."""
    hits = 0.0
    for line in httpx.get(metrics_url, timeout=10).text.splitlines():
        ours = line.startswith("ray_flux_lora_cache_total{") and 'application="loras"' in line
        if ours and 'outcome="hit"' in line:
            hits += float(line.rpartition(" ")[2])
    return hits


def test_alternating_adapters_each_stay_on_a_replica_of_their_own(
    serve_cluster: ServeCluster, lora_app: str
) -> None:
    """Two adapters in turn on two workers that keep one each: routed to where it is loaded,
    each request after the first two finds its adapter (least-busy routing alone sends every
    one of these sequential requests to the same worker, which then always loads)."""
    before = adapter_hits(serve_cluster.metrics_url)
    names = [ATTENTION, MLP] * 4
    for name in names:
        response = httpx.post(
            f"{lora_app}/generate", json={**SMALL, "loras": [{"name": name}]}, timeout=120
        )
        assert response.status_code == 200, response.text
    # Metrics are exported once a second: poll until the six hits arrive, or take what came.
    deadline = time.monotonic() + 30
    hits = 0.0
    while time.monotonic() < deadline and hits < len(names) - 2:
        time.sleep(1)
        hits = adapter_hits(serve_cluster.metrics_url) - before
    assert hits >= len(names) - 4, hits
