"""A worker replica computes on every core this host gives it, not on the one thread Ray sets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serve_app.generation.pipeline import FluxGenerator
from serve_app.generation.threads import available_cores, torch_threads
from serve_app.settings import ServiceSettings

from .conftest import ServeCluster


@pytest.mark.ray
def test_a_cpu_worker_replica_uses_every_core_and_sleeps_when_it_waits(
    serve_cluster: ServeCluster,  # noqa: ARG001 - deploys config/serve.yaml
) -> None:
    from ray import serve

    # Ray gives a replica of num_cpus 0.5 OMP_NUM_THREADS=1; the setting's default overrides it.
    worker = serve.get_deployment_handle("FluxWorker", app_name="flux")
    placement = worker.placement.remote().result(timeout_s=60)
    assert placement["device"] == "cpu"
    assert placement["torch_threads"] == str(available_cores())
    assert placement["omp_wait_policy"] == "PASSIVE"


def test_the_setting_sets_torch_threads(settings: ServiceSettings) -> None:
    before = torch.get_num_threads()
    try:
        FluxGenerator(settings.model_copy(update={"torch_threads": 1, "warmup": False}))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("device", "setting", "expected"),
    [
        pytest.param("cpu", None, "cores", id="cpu-default"),
        pytest.param("cpu", 3, 3, id="cpu-set"),
        pytest.param("cuda", None, None, id="gpu-default-leaves-torch-alone"),
        pytest.param("cuda", 2, 2, id="gpu-set"),
    ],
)
def test_thread_count_by_device_and_setting(
    settings: ServiceSettings, device: str, setting: int | None, expected: object
) -> None:
    chosen = torch_threads(
        settings.model_copy(update={"torch_threads": setting}), torch.device(device)
    )
    assert chosen == (available_cores() if expected == "cores" else expected)


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        pytest.param("max 100000\n", 2, id="no-limit"),
        pytest.param("150000 100000\n", 2, id="one-and-a-half-cores"),
        pytest.param("100000 100000\n", 1, id="one-core"),
        pytest.param("400000 100000\n", 2, id="limit-above-the-cores"),
    ],
)
def test_a_containers_cpu_limit_caps_the_cores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu_max: str, expected: int
) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1})
    limit = tmp_path / "cpu.max"
    limit.write_text(cpu_max)
    assert available_cores(limit) == expected
    assert available_cores(tmp_path / "absent") == 2
