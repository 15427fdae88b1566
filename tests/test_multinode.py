"""The Serve config on a real multi-node Ray cluster: a head and two worker nodes of one logical
GPU each, started with ``ray start`` on 127.0.0.1, the application deployed with the real
``serve run --address``, and one worker node killed in the middle of a request.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from deployments.local_cluster import deploy, free_port, wait_until_ready

from .conftest import ROOT, serve_config_for_tests
from .metrics import images_by_replica
from .midway import loses_no_image_when
from .ray_nodes import RayCluster, ray_cluster, text_of
from .redis_server import RedisServer

pytestmark = pytest.mark.ray

WORKER_NODES = ["w1", "w2"]
# Ingress and Scorer stay on the head, so that killing a worker node takes only its FluxWorker:
# the loss of the ingress's node is what the deployment guide describes (docs/deployment.md).
HEAD_ONLY = {"flux_head": 1.0}


@dataclass(frozen=True)
class MultiNodeService:
    cluster: RayCluster
    url: str
    storage_dir: Path


def multinode_config(http_port: int, storage_dir: Path, redis_url: str) -> dict[str, Any]:
    """config/serve.yaml as shipped, with one GPU per FluxWorker replica as in production, both
    replicas always up, and the other deployments on the head."""
    config = serve_config_for_tests(http_port, storage_dir, redis_url)
    (application,) = config["applications"]
    env = application["runtime_env"]["env_vars"]
    # Retries must outlast the detection of a dead node (a few seconds here) before they find
    # the surviving replica: 0.5 s doubling six times waits up to half a minute in all.
    env["FLUX_SERVE_MAX_RETRIES"] = "6"
    for deployment in application["deployments"]:
        options = deployment["ray_actor_options"]
        if deployment["name"] == "FluxWorker":
            options["num_gpus"] = 1
            deployment["autoscaling_config"]["min_replicas"] = 2
        else:
            options["resources"] = {"flux_head": 0.01}
    return config  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def multinode(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[MultiNodeService]:
    from serve_app.client.cli import build_tiny_models
    from serve_app.settings import get_settings

    build_tiny_models(get_settings().cache_dir)
    work = tmp_path_factory.mktemp("multinode")
    port = free_port()
    config_path = work / "serve.yaml"
    # A Redis database of its own: the session's cluster may have job consumers on the first.
    config = multinode_config(port, work / "images", redis_server.database(1))
    config_path.write_text(yaml.safe_dump(config))
    with ray_cluster(WORKER_NODES, HEAD_ONLY, work / "nodes") as cluster:
        deploy(config_path, cluster.address, ROOT)
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, timeout_s=300)
        yield MultiNodeService(cluster, url, work / "images")


PLACEMENTS = text_of(
    """
    from ray import serve

    handle = serve.get_deployment_handle("FluxWorker", app_name="flux")
    seen = {}
    for _ in range(50):
        # Calls routed together go to distinct replicas (deployments/routing.py).
        for call in [handle.placement.remote() for _ in range(4)]:
            placement = call.result(timeout_s=60)
            seen[placement["replica"]] = placement["node_id"]
        if len(seen) >= 2:
            break
    answer(seen)
    """
)


def replica_nodes(cluster: RayCluster) -> dict[str, str]:
    """The node id of each FluxWorker replica, by replica id, as the replicas tell it."""
    return cluster.probe(PLACEMENTS)  # type: ignore[no-any-return]


def images_per_node(service: MultiNodeService, names: list[str]) -> dict[str, float]:
    """Images made so far on each of these worker nodes, from the node's own metrics endpoint."""
    return {
        name: sum(images_by_replica(service.cluster.nodes[name].metrics_url, "flux").values())
        for name in names
    }


def images_made_while(
    service: MultiNodeService, expected: int, send: Any, names: list[str] = WORKER_NODES
) -> dict[str, float]:
    """How many images each of these worker nodes made while ``send()`` ran, once they have
    made ``expected`` in all (or after a minute)."""
    before = images_per_node(service, names)
    send()
    deadline = time.monotonic() + 60
    grown: dict[str, float] = {}
    while time.monotonic() < deadline:
        now = images_per_node(service, names)
        grown = {name: now[name] - before[name] for name in names}
        if sum(grown.values()) >= expected:
            break
        time.sleep(1)
    return grown


def two_gpu_request(service: MultiNodeService) -> None:
    payload = {"prompt": "a red cat", "nof_images": 8, "gpus": 2, "width": 64, "height": 64}
    response = httpx.post(f"{service.url}/generate", json=payload, timeout=180)
    assert response.status_code == 200, response.text


def test_worker_replicas_land_on_distinct_worker_nodes(multinode: MultiNodeService) -> None:
    nodes = multinode.cluster.alive_nodes()
    placed = replica_nodes(multinode.cluster)
    assert sorted(placed.values()) == sorted(nodes[name] for name in WORKER_NODES)


def test_gpus_2_uses_both_worker_nodes(multinode: MultiNodeService) -> None:
    made = images_made_while(multinode, 8, lambda: two_gpu_request(multinode))
    assert made == {"w1": 4.0, "w2": 4.0}


def test_a_worker_node_killed_mid_request_loses_no_image_and_comes_back(
    multinode: MultiNodeService,
) -> None:
    cluster = multinode.cluster

    def request_losing_w1() -> None:
        kill = cluster.nodes["w1"].kill
        loses_no_image_when(kill, multinode.url, multinode.storage_dir, timeout_s=300)

    # w2 made its own eight images and those w1 had not returned when it died.
    survivor = images_made_while(multinode, 9, request_losing_w1, names=["w2"])
    assert survivor["w2"] > 8

    # The node rejoins (a new node, with the same resources): the replica Serve could not place
    # while its GPU was gone starts there, and takes its share of the work again.
    cluster.restart(cluster.nodes["w1"])
    nodes = cluster.wait_for_nodes({"head", *WORKER_NODES})
    deadline = time.monotonic() + 240
    placed: dict[str, str] = {}
    while time.monotonic() < deadline:
        placed = replica_nodes(cluster)
        if sorted(placed.values()) == sorted(nodes[name] for name in WORKER_NODES):
            break
        time.sleep(2)
    assert sorted(placed.values()) == sorted(nodes[name] for name in WORKER_NODES)
    wait_until_ready(multinode.url, timeout_s=120)
    made = images_made_while(multinode, 8, lambda: two_gpu_request(multinode))
    assert made == {"w1": 4.0, "w2": 4.0}
