"""The application on a real Ray Serve instance, deployed from config/serve.yaml, over HTTP."""

from __future__ import annotations

import io
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from PIL import Image

from .conftest import ServeCluster
from .sse import parse_events
from .test_http_api import docs_pages_load_from_the_service
from .test_schemas import ORIGINAL_CLIENT

pytestmark = pytest.mark.ray


def post(cluster: ServeCluster, payload: dict[str, object]) -> httpx.Response:
    return httpx.post(f"{cluster.url}/generate", json=payload, timeout=120)


def test_the_readme_curl_gives_16_urls_that_open_as_images(serve_cluster: ServeCluster) -> None:
    response = post(serve_cluster, {"prompt": "a red cat"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["count"] == 16
    for image in body["images"]:
        assert image["url"].startswith(serve_cluster.url + "/images/")
        fetched = httpx.get(image["url"], timeout=30)
        assert fetched.status_code == 200
        picture = Image.open(io.BytesIO(fetched.content))
        assert picture.size == (256, 256)  # config/serve.yaml's default size
        assert (image["sampling_params"]["sampler"], image["sampling_params"]["steps"]) == (
            "euler",
            4,
        )
        assert isinstance(image["score"], float)


def test_the_original_clients_request_is_refused_only_for_ddim(serve_cluster: ServeCluster) -> None:
    refused = post(serve_cluster, ORIGINAL_CLIENT)
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert error["param"] == "diversity.samplers.1"
    assert "'ddim'" in error["message"]

    diversity = {**ORIGINAL_CLIENT["diversity"], "samplers": ["euler", "dpmpp_2m"]}  # type: ignore[dict-item]
    small = {**ORIGINAL_CLIENT, "diversity": diversity, "width": 64, "height": 64}
    response = post(serve_cluster, small)
    assert response.status_code == 200, response.text
    images = response.json()["images"]
    assert len(images) == 4
    # 2 x 3 x 3 = 18 combinations spread over 4 images: combinations 0, 4, 9 and 13.
    made = [
        (
            i["sampling_params"]["sampler"],
            i["sampling_params"]["steps"],
            i["sampling_params"]["cfg_scale"],
        )
        for i in images
    ]
    assert made == [
        ("euler", 10, 3.5),
        ("euler", 20, 5.0),
        ("dpmpp_2m", 10, 3.5),
        ("dpmpp_2m", 20, 5.0),
    ]
    assert len({i["sampling_params"]["seed"] for i in images}) == 4


def test_streaming_through_the_proxy(serve_cluster: ServeCluster) -> None:
    payload = {"prompt": "a red cat", "nof_images": 6, "stream": True, "gpus": 2}
    with httpx.stream(
        "POST", f"{serve_cluster.url}/generate", json=payload, timeout=120
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = parse_events(response.iter_lines())
    assert Counter(name for name, _ in events) == {"image": 6, "result": 1}
    assert events[-1][0] == "result"
    assert sorted(data["index"] for name, data in events if name == "image") == list(range(6))


def test_top_k_through_the_cluster_stores_only_k(serve_cluster: ServeCluster) -> None:
    response = post(
        serve_cluster,
        {"prompt": "a red cat", "nof_images": 5, "top_k": 2, "width": 64, "height": 64},
    )
    body = response.json()
    scores = [image["score"] for image in body["images"]]
    assert len(scores) == 2
    assert scores == sorted(scores, reverse=True)
    assert len(list((serve_cluster.storage_dir / body["request_id"]).iterdir())) == 2


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        pytest.param({"prompt": "x", "top_k": 3, "nof_images": 2}, "top_k", id="top-k"),
        pytest.param({"prompt": "x", "width": 1000}, "width", id="width"),
        pytest.param({"nof_images": 2}, "prompt", id="no-prompt"),
    ],
)
def test_bad_input_is_a_422_naming_the_field(
    serve_cluster: ServeCluster, payload: dict[str, object], param: str
) -> None:
    response = post(serve_cluster, payload)
    assert response.status_code == 422
    assert response.json()["error"]["param"] == param


def test_the_api_docs_load_through_the_proxy(serve_cluster: ServeCluster) -> None:
    with httpx.Client(base_url=serve_cluster.url, timeout=30) as client:
        docs_pages_load_from_the_service(client)


def test_each_gpu_worker_replica_sees_its_own_gpu(serve_cluster: ServeCluster) -> None:  # noqa: ARG001
    from ray import serve

    from deployments.flux_worker import FluxWorker

    worker = FluxWorker.options(
        num_replicas=2, ray_actor_options={"num_gpus": 1, "num_cpus": 0.25}
    ).bind()
    handle = serve.run(worker, name="placement", route_prefix=None)
    try:
        seen: dict[str, str] = {}
        for _ in range(50):
            for placement in [handle.placement.remote() for _ in range(4)]:
                result = placement.result(timeout_s=60)
                seen[result["replica"]] = result["cuda_visible_devices"]
            if len(seen) == 2:
                break
        assert len(seen) == 2
        assert sorted(seen.values()) == ["0", "1"]
    finally:
        serve.delete("placement")


def metric_samples(text: str, name: str) -> dict[str, float]:
    """Samples of metric ``name`` in Prometheus text, keyed by their label text."""
    samples = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line.rpartition(" ")
            samples[labels[len(name) :]] = float(value)
    return samples


def test_metrics_reach_prometheus_after_real_requests(serve_cluster: ServeCluster) -> None:
    assert (
        post(
            serve_cluster, {"prompt": "a red cat", "nof_images": 2, "width": 64, "height": 64}
        ).status_code
        == 200
    )
    assert post(serve_cluster, {"prompt": ""}).status_code == 422
    wanted = {
        "ray_flux_requests_total": lambda s: (
            any('outcome="success"' in k for k in s)
            and any('outcome="client_error"' in k for k in s)
        ),
        "ray_flux_images_generated_total": lambda s: any(
            'sampler="euler"' in k and v >= 2 for k, v in s.items()
        ),
        "ray_flux_generation_duration_seconds_count": lambda s: sum(s.values()) >= 1,
        "ray_flux_scoring_duration_seconds_count": lambda s: sum(s.values()) >= 1,
        "ray_flux_upload_duration_seconds_count": lambda s: sum(s.values()) >= 2,
        "ray_flux_jobs_in_flight": lambda s: len(s) >= 1,
    }
    deadline = time.monotonic() + 90
    missing = list(wanted)
    while missing and time.monotonic() < deadline:
        text = httpx.get(serve_cluster.metrics_url, timeout=10).text
        missing = [name for name, ok in wanted.items() if not ok(metric_samples(text, name))]
        if missing:
            time.sleep(1)
    assert not missing, f"metrics never exported: {missing}"
    assert "a red cat" not in text  # no prompt in any label
    assert 'deployment="FluxWorker"' in text


def test_logs_are_json_lines_that_carry_the_request_id(serve_cluster: ServeCluster) -> None:
    import json

    import ray

    request_id = "log-check-4711"
    response = httpx.post(
        f"{serve_cluster.url}/generate",
        json={"prompt": "a secret prompt", "nof_images": 1, "width": 64, "height": 64},
        headers={"X-Request-Id": request_id},
        timeout=120,
    )
    assert response.headers["X-Request-Id"] == request_id
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    deadline = time.monotonic() + 30
    records: list[dict[str, object]] = []
    while not records and time.monotonic() < deadline:
        for path in logs.glob("replica_flux_Ingress_*.log"):
            for line in path.read_text().splitlines():
                if request_id in line:
                    records.append(json.loads(line))
        time.sleep(0.5)
    assert records, "no log line carries the request id"
    # Ray Serve's proxy may list the header once more in the field ("id, id").
    assert all(request_id in str(record["request_id"]) for record in records)
    # Prompts are logged at debug level only: not at the configured INFO level.
    assert not any("a secret prompt" in str(record) for record in records)
