"""Admission by cost: what a request costs, how fast the workers are, what is admitted, refused."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr

from serve_app.api.admission import Admission, WorkerSpeeds
from serve_app.api.jobs import JobBackend
from serve_app.api.routes import create_app
from serve_app.faults import KeyAtCapacity, Overloaded
from serve_app.generation.cost import job_work, work_of
from serve_app.generation.pipeline import RenderedImage
from serve_app.generation.planning import SamplingJob, plan_jobs
from serve_app.inputs.reading import read_inputs
from serve_app.jobs.store import JobStore
from serve_app.schemas import GenerateRequest
from serve_app.settings import ServiceSettings
from serve_app.storage.local import LocalImageStore

from .conftest import MakeService
from .images import data_url, encode, gradient
from .live_server import always_ready


def jobs_of(settings: ServiceSettings, **fields: object) -> list[SamplingJob]:
    request = GenerateRequest.model_validate({"prompt": "a red cat", **fields})
    return plan_jobs(request, settings)


@pytest.fixture
def bare(settings: ServiceSettings) -> ServiceSettings:
    """Only transformer calls count: one 1024x1024 image of 4 euler steps is 4 units."""
    return settings.model_copy(
        update={"admission_decode_calls": 0.0, "admission_image_overhead": 0.0}
    )


def one_image(settings: ServiceSettings, **fields: object) -> float:
    (job,) = jobs_of(settings, nof_images=1, **fields)
    return job_work(job, settings)


@pytest.mark.parametrize(
    ("fields", "units"),
    [
        pytest.param({"width": 1024, "height": 1024}, 4, id="one-megapixel-four-steps"),
        pytest.param({"width": 512, "height": 512}, 1, id="a-quarter-of-the-pixels"),
        pytest.param({"width": 2048, "height": 1024, "diversity": {"nof_steps": [8]}}, 16, id="8"),
        pytest.param({"width": 1024, "height": 1024, "diversity": {"samplers": ["heun"]}}, 7,
                     id="heun-calls-twice-per-step-but-the-first"),
        pytest.param({"width": 1024, "height": 1024, "diversity": {"cfg_scales": [3.5]}}, 8,
                     id="true-guidance-doubles-the-calls"),
    ],
)  # fmt: skip
def test_work_is_model_calls_times_megapixels(
    bare: ServiceSettings, fields: dict[str, object], units: float
) -> None:
    assert one_image(bare, **fields) == units


def test_a_guidance_distilled_model_takes_the_scale_as_input_at_no_extra_cost(
    bare: ServiceSettings,
) -> None:
    dev = bare.model_copy(update={"profile": "dev"})
    guided = {"width": 1024, "height": 1024, "diversity": {"nof_steps": [4], "cfg_scales": [3.5]}}
    assert one_image(dev, **guided) == 4


@pytest.mark.parametrize(("strength", "steps_run"), [(1.0, 4), (0.5, 2), (0.3, 1), (0.01, 1)])
def test_an_image_from_an_input_costs_only_the_steps_its_strength_runs(
    bare: ServiceSettings, strength: float, steps_run: int
) -> None:
    request = GenerateRequest.model_validate(
        {
            "prompt": "a red cat",
            "nof_images": 1,
            "image": data_url(encode(gradient(1024, 1024))),
            "strength": strength,
        }
    )
    inputs = asyncio.run(read_inputs(request, bare))
    (job,) = plan_jobs(request, bare, inputs)
    assert (job.params.width, job.params.height) == (1024, 1024)
    assert job_work(job, bare) == steps_run  # one megapixel, one euler call per step run


def test_decoding_scales_with_pixels_and_the_overhead_does_not(bare: ServiceSettings) -> None:
    costed = bare.model_copy(
        update={"admission_decode_calls": 1.5, "admission_image_overhead": 0.25}
    )
    assert one_image(costed, width=1024, height=1024) == 4 + 1.5 + 0.25
    assert one_image(costed, width=512, height=512) == 1 + 1.5 / 4 + 0.25
    sixteen = jobs_of(costed, nof_images=16, width=512, height=512)
    assert work_of(sixteen, costed) == 16 * (1 + 1.5 / 4 + 0.25)


def test_a_replicas_first_batch_sets_its_speed_and_later_ones_move_it_by_their_time() -> None:
    speeds = WorkerSpeeds(prior=1.0, window_s=30.0, replicas=2)
    assert speeds.capacity() == 2.0  # nobody heard yet: the prior at max replicas
    speeds.observe("a", units=40.0, seconds=4.0)
    assert speeds.speed("a") == 10.0
    assert speeds.capacity() == 10.0 + 1.0
    speeds.observe("a", units=60.0, seconds=30.0)  # 2 units/s, for one time constant
    assert speeds.speed("a") == pytest.approx(10.0 + (1 - math.exp(-1)) * (2.0 - 10.0))
    speeds.observe("a", units=5.0, seconds=0.0)  # no time measured: nothing learnt
    assert speeds.speed("a") == pytest.approx(10.0 + (1 - math.exp(-1)) * (2.0 - 10.0))


def test_only_the_replicas_heard_from_last_stand_for_the_max_replicas() -> None:
    speeds = WorkerSpeeds(prior=1.0, window_s=30.0, replicas=2)
    for worker, speed in (("old", 50.0), ("b", 4.0), ("c", 6.0)):
        speeds.observe(worker, units=speed, seconds=1.0)
    assert speeds.speed("old") is None  # replaced: its successor reports instead
    assert speeds.capacity() == 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tight(bare: ServiceSettings) -> ServiceSettings:
    """2 replicas at the prior of 1 unit/s, a 100 s deadline of which half may be filled: the
    admitted work may need at most 50 s, 100 units."""
    return bare.model_copy(
        update={
            "admission_prior_speed": 1.0,
            "max_gpus_per_request": 2,
            "request_timeout_s": 100.0,
            "admission_deadline_share": 0.5,
            "admission_key_share": 0.5,
        }
    )


def forty_units(settings: ServiceSettings) -> list[SamplingJob]:
    return jobs_of(settings, nof_images=10, width=1024, height=1024)


def made(jobs: list[SamplingJob], worker: str, seconds_each: float) -> list[RenderedImage]:
    return [RenderedImage(job=job, data=b"", compute_s=seconds_each, worker=worker) for job in jobs]


def test_requests_are_admitted_while_all_their_work_fits_and_refused_at_once_after(
    tight: ServiceSettings, clock: Clock
) -> None:
    admission = Admission(tight, clock)
    first = admission.admit(forty_units(tight))
    admission.admit(forty_units(tight))
    with pytest.raises(Overloaded) as refused:
        admission.admit(forty_units(tight))
    # 120 units take 60 s at 2 units/s, 10 s more than the 50 s allowed.
    assert refused.value.retry_after_s == 10
    assert "the workers are busy" in str(refused.value)
    assert admission.backlog() == 80
    # The first request's images are made, at 5 units/s on worker "a": its work is done, and
    # the workers turn out faster than the prior.
    first.progress(made(forty_units(tight), "a", seconds_each=0.8))
    assert admission.backlog() == 40
    assert admission.speeds.capacity() == pytest.approx(5.0 + 1.0)
    admission.admit(forty_units(tight))
    first.release()
    first.release()  # harmless
    assert admission.backlog() == 80


def test_new_work_must_also_fit_before_the_earliest_admitted_deadline(
    tight: ServiceSettings, clock: Clock
) -> None:
    admission = Admission(tight, clock)
    admission.admit(forty_units(tight))
    clock.now += 70  # 30 s left of the first request's deadline: 15 s may be filled, 30 units
    small = jobs_of(tight, nof_images=1, width=1024, height=1024)
    with pytest.raises(Overloaded):
        # 44 units would take 22 s: the new request's own deadline allows it, the first's not.
        admission.admit(small)


def test_a_request_larger_than_any_deadline_allows_is_told_so(
    tight: ServiceSettings, clock: Clock
) -> None:
    admission = Admission(tight, clock)
    huge = jobs_of(tight, nof_images=26, width=1024, height=1024)  # 104 units, 52 s
    with pytest.raises(Overloaded) as refused:
        admission.admit(huge, elsewhere="POST /jobs")
    message = str(refused.value)
    assert "even when they are idle" in message
    assert message.endswith("or send it to POST /jobs")
    assert not admission.tickets


def test_a_request_must_also_fit_on_the_workers_its_gpus_give_it(
    tight: ServiceSettings, clock: Clock
) -> None:
    admission = Admission(tight, clock)
    eighty = jobs_of(tight, nof_images=20, width=1024, height=1024)
    # Both workers would do it in 40 s, but one shard on one worker takes 80 s.
    with pytest.raises(Overloaded, match="on 1 worker"):
        admission.admit(eighty, gpus=1)
    admission.admit(eighty, gpus=2)


def test_one_key_holds_at_most_its_share_and_another_key_still_gets_in(
    tight: ServiceSettings, clock: Clock
) -> None:
    admission = Admission(tight, clock)
    admission.admit(forty_units(tight), key="key-a")
    with pytest.raises(KeyAtCapacity) as refused:
        admission.admit(forty_units(tight), key="key-a")
    # The key's share is 50 units: 80 exceed it by 30, 15 s of the workers' time.
    assert refused.value.retry_after_s == 15
    admission.admit(forty_units(tight), key="key-b")


def test_past_the_request_bound_the_cost_does_not_matter(
    tight: ServiceSettings, clock: Clock
) -> None:
    admission = Admission(tight.model_copy(update={"max_concurrent_requests": 1}), clock)
    admission.admit(jobs_of(tight, nof_images=1, width=64, height=64))
    with pytest.raises(Overloaded) as refused:
        admission.admit(jobs_of(tight, nof_images=1, width=64, height=64))
    assert refused.value.retry_after_s is None  # the settings' Retry-After applies


@pytest.fixture
def slow_app(
    settings: ServiceSettings, make_service: MakeService, store: LocalImageStore
) -> FastAPI:
    """Workers assumed so slow that no 16-image request fits in the deadline."""
    slow = settings.model_copy(update={"admission_prior_speed": 1e-4})
    return create_app(make_service(slow, store), always_ready)


def test_an_overloaded_request_gets_a_503_with_the_wait_and_no_work_is_done(
    slow_app: FastAPI,
) -> None:
    with TestClient(slow_app) as client:
        response = client.post("/generate", json={"prompt": "a red cat"})
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["type"] == "overloaded"
    assert "even when they are idle" in error["message"]
    assert "/jobs" not in error["message"]  # this app has no jobs API
    assert int(response.headers["Retry-After"]) >= 1
    assert not slow_app.state.admission.tickets


class NoQueue:
    """Where the jobs of an app that only refuses requests would go: never used."""

    def submit(self, job_id: str, delay_s: float = 0) -> None:
        raise AssertionError(f"job {job_id} queued in {delay_s} s")

    def send_webhook(self, delivery: object) -> None:
        raise AssertionError(f"webhook queued: {delivery}")


def test_the_refusal_points_to_the_jobs_api_where_the_app_has_one(
    settings: ServiceSettings, make_service: MakeService, store: LocalImageStore
) -> None:
    slow = settings.model_copy(update={"admission_prior_speed": 1e-4})
    # Never contacted: the request is refused before anything reaches Redis.
    unused = JobStore("redis://127.0.0.1:1/0", retention_s=60, idempotency_ttl_s=60)
    app = create_app(make_service(slow, store), always_ready, jobs=JobBackend(unused, NoQueue()))
    with TestClient(app) as client:
        response = client.post("/generate", json={"prompt": "a red cat"})
    assert response.status_code == 503
    assert response.json()["error"]["message"].endswith("or send it to POST /jobs")


@pytest.fixture
def keyed_client(
    settings: ServiceSettings, make_service: MakeService, store: LocalImageStore
) -> Iterator[TestClient]:
    """Two API keys; each may hold a tenth of what is admitted, about 2 units at the prior."""
    keyed = settings.model_copy(
        update={
            "api_keys": [SecretStr("first-key"), SecretStr("second-key")],
            "admission_prior_speed": 0.05,
            "request_timeout_s": 100.0,
            "admission_key_share": 0.2,
        }
    )
    with TestClient(create_app(make_service(keyed, store), always_ready)) as client:
        yield client


def test_a_key_beyond_its_share_gets_a_429_with_retry_after(keyed_client: TestClient) -> None:
    big = {"prompt": "a red cat", "nof_images": 16, "width": 512, "height": 512}
    response = keyed_client.post(
        "/generate", json=big, headers={"Authorization": "Bearer first-key"}
    )
    assert response.status_code == 429
    assert response.json()["error"]["type"] == "key_at_capacity"
    assert "first-key" not in response.text
    assert int(response.headers["Retry-After"]) >= 1
    small = {"prompt": "a red cat", "nof_images": 1, "width": 64, "height": 64}
    for key in ("first-key", "second-key"):
        answer = keyed_client.post(
            "/generate", json=small, headers={"Authorization": f"Bearer {key}"}
        )
        assert answer.status_code == 200, answer.text


def test_the_openai_api_is_admitted_by_cost_and_key_in_its_own_envelope(
    keyed_client: TestClient,
) -> None:
    big = {"prompt": "a red cat", "n": 10, "size": "1024x1024"}
    response = keyed_client.post(
        "/v1/images/generations", json=big, headers={"Authorization": "Bearer first-key"}
    )
    assert response.status_code == 429
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "key_at_capacity")
    assert int(response.headers["Retry-After"]) >= 1
    small = {"prompt": "a red cat", "n": 1, "size": "256x256", "response_format": "b64_json"}
    answer = keyed_client.post(
        "/v1/images/generations", json=small, headers={"Authorization": "Bearer first-key"}
    )
    assert answer.status_code == 200, answer.text
    assert not keyed_client.app.state.admission.tickets  # type: ignore[attr-defined]


def test_finished_batches_teach_the_admission_the_workers_speed(
    settings: ServiceSettings, make_service: MakeService, store: LocalImageStore
) -> None:
    app = create_app(make_service(settings, store), always_ready)
    admission: Admission = app.state.admission
    assert admission.speeds.speed("local") is None

    async def scenario() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(
                "/generate", json={"prompt": "a red cat", "nof_images": 4, "stream": True}
            )

    assert asyncio.run(scenario()).status_code == 200
    speed = admission.speeds.speed("local")  # the in-process scheduler's worker name
    assert speed is not None
    assert speed > 0
    assert not admission.tickets
    assert admission.backlog() == 0
