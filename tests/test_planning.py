"""Planning: which parameters and seed each image gets."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest

from serve_app.generation.planning import derive_seed, plan_jobs, shard, spread
from serve_app.schemas import GenerateRequest
from serve_app.settings import ServiceSettings


def request(**fields: object) -> GenerateRequest:
    return GenerateRequest.model_validate({"prompt": "a red cat", **fields})


@pytest.mark.parametrize(
    ("combinations", "count", "expected"),
    [
        pytest.param(9, 3, [0, 3, 6], id="fewer-images-spread-evenly"),
        pytest.param(4, 2, [0, 2], id="half"),
        pytest.param(3, 3, [0, 1, 2], id="equal"),
        pytest.param(2, 5, [0, 1, 0, 1, 0], id="more-images-cycle"),
        pytest.param(1, 3, [0, 0, 0], id="single-combination"),
    ],
)
def test_spread(combinations: int, count: int, expected: list[int]) -> None:
    assert spread(combinations, count) == expected


def test_omitted_diversity_means_the_models_native_settings(settings: ServiceSettings) -> None:
    jobs = plan_jobs(request(nof_images=3), settings)
    assert {(j.params.sampler, j.params.steps, j.params.cfg_scale) for j in jobs} == {
        ("euler", 4, 1.0)
    }
    assert [j.index for j in jobs] == [0, 1, 2]
    assert {(j.params.width, j.params.height) for j in jobs} == {
        (settings.default_width, settings.default_height)
    }


def test_the_product_of_diversity_is_assigned_deterministically(settings: ServiceSettings) -> None:
    diversity = {"samplers": ["euler", "heun"], "nof_steps": [2, 4], "cfg_scales": [1.0, 2.0]}
    product = list(itertools.product(*diversity.values()))
    jobs = plan_jobs(request(nof_images=12, diversity=diversity), settings)
    made = [(j.params.sampler, j.params.steps, j.params.cfg_scale) for j in jobs]
    assert made == [product[i % 8] for i in range(12)]
    few = plan_jobs(request(nof_images=4, diversity=diversity), settings)
    assert [(j.params.sampler, j.params.steps, j.params.cfg_scale) for j in few] == [
        product[0],
        product[2],
        product[4],
        product[6],
    ]


def test_fixed_seeds_all_use_base_seed(settings: ServiceSettings) -> None:
    jobs = plan_jobs(request(nof_images=4, base_seed=7, diversity={"seeds": "fixed"}), settings)
    assert {j.params.seed for j in jobs} == {7}
    unset = plan_jobs(request(nof_images=2, diversity={"seeds": "fixed"}), settings)
    assert {j.params.seed for j in unset} == {0}


def test_mix_seeds_differ_per_image_and_repeat_per_request(settings: ServiceSettings) -> None:
    first = [j.params.seed for j in plan_jobs(request(nof_images=16, base_seed=3), settings)]
    again = [j.params.seed for j in plan_jobs(request(nof_images=16, base_seed=3), settings)]
    other = [j.params.seed for j in plan_jobs(request(nof_images=16, base_seed=4), settings)]
    assert first == again
    assert len(set(first)) == 16
    assert first != other


def test_mix_seeds_are_the_same_in_another_process() -> None:
    code = "from serve_app.generation.planning import derive_seed; print(derive_seed(3, 5))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert int(out.stdout) == derive_seed(3, 5)


def test_random_seeds_are_fresh_per_image_and_request(settings: ServiceSettings) -> None:
    spec = request(nof_images=8, diversity={"seeds": "random"})
    first = [j.params.seed for j in plan_jobs(spec, settings)]
    second = [j.params.seed for j in plan_jobs(spec, settings)]
    assert len(set(first)) == 8
    assert first != second


@pytest.mark.parametrize(
    ("count", "parts", "sizes"), [(16, 2, [8, 8]), (5, 3, [2, 2, 1]), (2, 8, [1, 1])]
)
def test_shards_cover_every_job_once(
    settings: ServiceSettings, count: int, parts: int, sizes: list[int]
) -> None:
    jobs = plan_jobs(request(nof_images=count), settings)
    shards = shard(jobs, parts)
    assert [len(s) for s in shards] == sizes
    assert [j for s in shards for j in s] == jobs
