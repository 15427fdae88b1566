"""/jobs on the in-process application, with a real Redis and the real Celery queue (nothing
consumes it here: the runner is driven by the tests), and the runner on the in-process models."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import SecretStr

from deployments.job_queue import CeleryJobQueue
from serve_app.api.jobs import JobBackend
from serve_app.api.routes import create_app
from serve_app.faults import WorkerLost
from serve_app.generation.pipeline import RenderedImage
from serve_app.generation.planning import SamplingJob
from serve_app.inputs.pixels import RenderInputs
from serve_app.jobs.runner import JobRunner
from serve_app.jobs.store import JobStore
from serve_app.jobs.webhooks import WebhookDelivery, deliver
from serve_app.service import GenerationService, RenderStream
from serve_app.settings import ServiceSettings
from serve_app.storage.local import LocalImageStore
from serve_app.telemetry import JobOutcome, NoTelemetry

from .conftest import WEBHOOK_SECRET, MakeService
from .images import data_url, encode, gradient
from .live_server import always_ready
from .redis_server import RedisServer
from .webhook_receiver import webhook_receiver

SMALL = {"prompt": "a red cat", "nof_images": 4, "width": 64, "height": 64}


@pytest.fixture
def jobs_settings(settings: ServiceSettings, redis_server: RedisServer) -> ServiceSettings:
    """The session's settings on database 1 of the session's Redis and a queue of their own:
    the cluster's runners never see these jobs."""
    return settings.model_copy(
        update={
            "redis_url": redis_server.url.replace("/0", "/1"),
            "jobs_queue": "api-tests-jobs",
            "webhooks_queue": "api-tests-webhooks",
            "webhook_secret": SecretStr(WEBHOOK_SECRET),
            "webhook_allowed_hosts": ["127.0.0.1"],
            "jobs_max_attempts": 2,
        }
    )


def job_store(settings: ServiceSettings) -> JobStore:
    return JobStore(
        settings.redis_url,
        retention_s=settings.jobs_retention_s,
        idempotency_ttl_s=settings.idempotency_ttl_s,
    )


@pytest.fixture
def jobs_client(
    jobs_settings: ServiceSettings, make_service: MakeService, store: LocalImageStore
) -> Iterator[TestClient]:
    backend = JobBackend(job_store(jobs_settings), CeleryJobQueue(jobs_settings))
    app = create_app(make_service(jobs_settings, store), always_ready, jobs=backend)
    with TestClient(app) as client:
        yield client


def queued_runs(settings: ServiceSettings) -> int:
    """Runs waiting in the Celery queue (a Redis list)."""
    return int(redis.Redis.from_url(settings.redis_url).llen(settings.jobs_queue))


def test_a_submission_is_a_202_with_the_job_queued_in_celery(
    jobs_client: TestClient, jobs_settings: ServiceSettings
) -> None:
    before = queued_runs(jobs_settings)
    response = jobs_client.post("/jobs", json=SMALL)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/jobs/{job['id']}"
    assert job["status"] == "queued"
    assert job["progress"] == {"done": 0, "total": 4}
    assert (job["images"], job["result"], job["error"]) == ([], None, None)
    assert job["started_at"] is None
    assert queued_runs(jobs_settings) == before + 1
    assert jobs_client.get(f"/jobs/{job['id']}").json() == job


@pytest.mark.parametrize(
    ("body", "param", "reason"),
    [
        pytest.param({**SMALL, "stream": True}, "stream", "do not stream", id="stream"),
        pytest.param({**SMALL, "top_k": 9}, "top_k", "must not exceed", id="generate-rules"),
        pytest.param({**SMALL, "webhook": "ftp://example.com/x"}, "webhook", "scheme", id="ftp"),
        pytest.param(
            {**SMALL, "webhook": "http://169.254.169.254/latest/meta-data"},
            "webhook",
            "non-public",
            id="cloud-metadata",
        ),
        pytest.param(
            {**SMALL, "webhook": "http://10.1.2.3/hook"}, "webhook", "non-public", id="private"
        ),
        pytest.param({**SMALL, "webhok": "http://x"}, "webhok", "Extra inputs", id="unknown"),
        pytest.param(
            {**SMALL, "loras": [{"name": "tiny-mlp"}, {"name": "nobody"}]},
            "loras.1.name",
            "no adapter 'nobody'",
            id="unknown-adapter",
        ),
    ],
)
def test_bad_input_is_a_422_naming_the_field(
    jobs_client: TestClient, body: dict[str, Any], param: str, reason: str
) -> None:
    response = jobs_client.post("/jobs", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert reason in error["message"]


def test_webhooks_need_a_signing_secret(
    jobs_settings: ServiceSettings, make_service: MakeService, store: LocalImageStore
) -> None:
    unsigned = jobs_settings.model_copy(update={"webhook_secret": None})
    backend = JobBackend(job_store(unsigned), CeleryJobQueue(unsigned))
    with TestClient(create_app(make_service(unsigned, store), always_ready, jobs=backend)) as c:
        response = c.post("/jobs", json={**SMALL, "webhook": "http://127.0.0.1:9/hook"})
    assert response.status_code == 422
    assert "FLUX_SERVE_WEBHOOK_SECRET" in response.json()["error"]["message"]


def test_an_allow_listed_webhook_host_is_accepted(jobs_client: TestClient) -> None:
    response = jobs_client.post("/jobs", json={**SMALL, "webhook": "http://127.0.0.1:9/hook"})
    assert response.status_code == 202, response.text


def test_an_idempotency_key_answers_the_same_job_and_refuses_another_body(
    jobs_client: TestClient, jobs_settings: ServiceSettings
) -> None:
    headers = {"Idempotency-Key": f"order-{time.time_ns()}"}
    first = jobs_client.post("/jobs", json=SMALL, headers=headers)
    before = queued_runs(jobs_settings)
    again = jobs_client.post("/jobs", json={**SMALL, "diversity": None}, headers=headers)
    assert (first.status_code, again.status_code) == (202, 202)
    assert again.json()["id"] == first.json()["id"]
    assert queued_runs(jobs_settings) == before  # not queued twice
    other = jobs_client.post("/jobs", json={**SMALL, "nof_images": 5}, headers=headers)
    assert other.status_code == 409
    assert other.json()["error"]["type"] == "conflict"


@pytest.mark.parametrize("job_id", ["0" * 32, "not-a-job", "A" * 32], ids=str)
def test_an_unknown_or_malformed_job_id_is_a_404(jobs_client: TestClient, job_id: str) -> None:
    for method in ("GET", "DELETE"):
        response = jobs_client.request(method, f"/jobs/{job_id}")
        assert response.status_code == 404, (method, response.text)
        assert response.json()["error"]["type"] == "not_found"


def test_with_api_keys_a_job_is_visible_only_with_the_key_that_made_it(
    jobs_settings: ServiceSettings, make_service: MakeService, store: LocalImageStore
) -> None:
    keyed = jobs_settings.model_copy(update={"api_keys": [SecretStr("key-a"), SecretStr("key-b")]})
    backend = JobBackend(job_store(keyed), CeleryJobQueue(keyed))
    with TestClient(create_app(make_service(keyed, store), always_ready, jobs=backend)) as client:
        assert client.post("/jobs", json=SMALL).status_code == 401
        a, b = ({"Authorization": f"Bearer key-{name}"} for name in "ab")
        job_id = client.post("/jobs", json=SMALL, headers=a).json()["id"]
        assert client.get(f"/jobs/{job_id}", headers=b).status_code == 404
        assert client.delete(f"/jobs/{job_id}", headers=b).status_code == 404
        assert client.get(f"/jobs/{job_id}", headers=a).status_code == 200


def counting(
    render: RenderStream,
    rendered: list[int],
    fail_after: int | None = None,
    after_batch: Callable[[int], None] | None = None,
) -> RenderStream:
    """``render`` that notes each job it makes, loses its worker after ``fail_after``, and calls
    ``after_batch`` with the count so far once each batch has been taken."""

    async def render_counting(
        jobs: list[SamplingJob], inputs: RenderInputs
    ) -> AsyncIterator[list[RenderedImage]]:
        async for batch in render(jobs, inputs):
            if fail_after is not None and len(rendered) >= fail_after:
                raise WorkerLost("a FluxWorker replica was lost: test")
            rendered.extend(image.job.index for image in batch)
            yield batch
            if after_batch is not None:
                after_batch(len(rendered))

    return render_counting


def make_runner(
    settings: ServiceSettings,
    make_service: MakeService,
    store: LocalImageStore,
    rendered: list[int],
    fail_after: int | None = None,
    after_batch: Callable[[int], None] | None = None,
    telemetry: NoTelemetry | None = None,
) -> JobRunner:
    service = make_service(settings, store)
    render = counting(service._render, rendered, fail_after, after_batch)
    return job_runner(settings, make_service(settings, store, render), telemetry)


def job_runner(
    settings: ServiceSettings, service: GenerationService, telemetry: NoTelemetry | None = None
) -> JobRunner:
    return JobRunner(settings, job_store(settings), service, CeleryJobQueue(settings), telemetry)


def queued_webhook(settings: ServiceSettings, job_id: str) -> WebhookDelivery:
    """The job's webhook delivery, as it waits in its Celery queue (kombu keeps each message as
    JSON in a Redis list, the task's arguments base64-encoded in its body)."""
    for raw in redis.Redis.from_url(settings.redis_url).lrange(settings.webhooks_queue, 0, -1):
        args, _, _ = json.loads(base64.b64decode(json.loads(raw)["body"]))
        delivery = WebhookDelivery.model_validate(args[0])
        if delivery.message_id == f"msg_{job_id}":
            return delivery
    raise AssertionError(f"no webhook of job {job_id} in the queue")


def delivered_webhook(settings: ServiceSettings, job_id: str) -> dict[str, Any]:
    """The job's queued webhook, delivered as WebhookSender delivers it, as a receiver that
    verifies its signature got it."""
    with webhook_receiver(WEBHOOK_SECRET) as receiver:
        delivery = queued_webhook(settings, job_id).model_copy(update={"url": receiver.url})
        deliver(delivery, secret=WEBHOOK_SECRET, allowed_hosts=["127.0.0.1"], timeout_s=30)
        (job,) = receiver.wait_for(1, timeout_s=30)
    return job


def assert_made_once(
    client: TestClient, store: LocalImageStore, job_id: str, rendered: list[int]
) -> None:
    """The job succeeded with its eight images, each made and stored exactly once."""
    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job
    assert sorted(rendered) == list(range(8))
    assert sorted(image["index"] for image in job["result"]["images"]) == list(range(8))
    assert len(list((Path(store.root) / job_id).iterdir())) == 8


@pytest.fixture
def job_of_eight(jobs_client: TestClient) -> str:
    """A queued job of eight images: two batches."""
    return str(jobs_client.post("/jobs", json={**SMALL, "nof_images": 8}).json()["id"])


def test_a_cancelled_queued_job_never_runs(
    jobs_client: TestClient,
    jobs_settings: ServiceSettings,
    make_service: MakeService,
    store: LocalImageStore,
) -> None:
    body = {**SMALL, "webhook": "http://127.0.0.1:9/hook"}
    job_id = jobs_client.post("/jobs", json=body).json()["id"]
    cancelled = jobs_client.delete(f"/jobs/{job_id}")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert jobs_client.delete(f"/jobs/{job_id}").status_code == 409
    announced = delivered_webhook(jobs_settings, job_id)  # at once: no runner will announce it
    assert (announced["id"], announced["status"]) == (job_id, "cancelled")
    rendered: list[int] = []
    runner = make_runner(jobs_settings, make_service, store, rendered)
    assert asyncio.run(runner.run(job_id)) == "done"  # Celery's delivery of its task
    assert rendered == []
    job = jobs_client.get(f"/jobs/{job_id}").json()
    assert (job["status"], job["started_at"]) == ("cancelled", None)


def cancelling(client: TestClient, job_id: str, *, after: int) -> Callable[[int], None]:
    """An ``after_batch`` that cancels the job once ``after`` of its images have been made."""

    def cancel(made: int) -> None:
        if made == after:
            assert client.delete(f"/jobs/{job_id}").status_code == 200

    return cancel


class EndsCounted(NoTelemetry):
    """Telemetry that keeps the jobs' ends it is told of."""

    def __init__(self) -> None:
        self.ends: list[str] = []

    def job_finished(self, outcome: JobOutcome) -> None:
        self.ends.append(outcome)


def test_a_job_cancelled_as_its_last_images_are_stored_ends_cancelled_counted_once(
    jobs_client: TestClient,
    jobs_settings: ServiceSettings,
    make_service: MakeService,
    store: LocalImageStore,
    job_of_eight: str,
) -> None:
    telemetry = EndsCounted()
    runner = make_runner(
        jobs_settings,
        make_service,
        store,
        [],
        after_batch=cancelling(jobs_client, job_of_eight, after=8),
        telemetry=telemetry,
    )
    assert asyncio.run(runner.run(job_of_eight)) == "done"
    job = jobs_client.get(f"/jobs/{job_of_eight}").json()
    assert (job["status"], job["result"]) == ("cancelled", None)
    assert telemetry.ends == ["cancelled"]


def test_a_job_cancelled_mid_run_stops_after_the_batch_it_was_storing(
    jobs_client: TestClient,
    jobs_settings: ServiceSettings,
    make_service: MakeService,
    store: LocalImageStore,
    job_of_eight: str,
) -> None:
    # A lease of a minute: the runner's watch ticks once a second, far longer than the second
    # batch of four 64-pixel images takes, so only the check at each stored image can stop it.
    slow_tick = jobs_settings.model_copy(update={"jobs_lease_s": 60.0})

    runner = make_runner(
        slow_tick,
        make_service,
        store,
        [],
        after_batch=cancelling(jobs_client, job_of_eight, after=4),
    )
    assert asyncio.run(runner.run(job_of_eight)) == "done"
    job = jobs_client.get(f"/jobs/{job_of_eight}").json()
    assert (job["status"], job["progress"]["done"]) == ("cancelled", 4)
    assert sorted(image["index"] for image in job["images"]) == [0, 1, 2, 3]
    assert len(list((Path(store.root) / job_of_eight).iterdir())) == 4


def test_a_job_applies_its_adapters_as_they_were_when_it_was_submitted(
    jobs_client: TestClient,
    jobs_settings: ServiceSettings,
    make_service: MakeService,
    store: LocalImageStore,
) -> None:
    loras = [{"name": "tiny-attention", "scale": 0.5}]
    submitted = jobs_client.post("/jobs", json={**SMALL, "loras": loras}).json()
    (digest,) = [
        item["digest"]
        for item in jobs_client.get("/loras").json()["loras"]
        if item["name"] == "tiny-attention"
    ]
    asyncio.run(make_runner(jobs_settings, make_service, store, []).run(submitted["id"]))
    job = jobs_client.get(f"/jobs/{submitted['id']}").json()
    assert job["status"] == "succeeded", job
    for image in job["result"]["images"]:
        assert image["sampling_params"]["loras"] == [{**loras[0], "digest": digest}]


def test_a_run_after_a_lost_one_makes_only_the_missing_images_and_stores_each_once(
    jobs_client: TestClient,
    jobs_settings: ServiceSettings,
    make_service: MakeService,
    store: LocalImageStore,
    job_of_eight: str,
) -> None:
    first: list[int] = []
    losing = make_runner(jobs_settings, make_service, store, first, fail_after=4)
    with pytest.raises(WorkerLost):  # the first run fails; Celery retries it
        asyncio.run(losing.run(job_of_eight))
    half = jobs_client.get(f"/jobs/{job_of_eight}").json()
    assert half["status"] == "running"
    assert half["progress"]["done"] == len(first) == 4
    second: list[int] = []
    asyncio.run(make_runner(jobs_settings, make_service, store, second).run(job_of_eight))
    assert_made_once(jobs_client, store, job_of_eight, first + second)


def test_a_job_whose_runs_keep_failing_is_failed_with_the_error(
    jobs_client: TestClient,
    jobs_settings: ServiceSettings,
    make_service: MakeService,
    store: LocalImageStore,
) -> None:
    body = {**SMALL, "webhook": "http://127.0.0.1:9/hook"}
    job_id = jobs_client.post("/jobs", json=body).json()["id"]
    for _ in range(jobs_settings.jobs_max_attempts - 1):
        with pytest.raises(WorkerLost):
            asyncio.run(make_runner(jobs_settings, make_service, store, [], 0).run(job_id))
    # The last allowed run fails the job instead of raising for another retry.
    assert asyncio.run(make_runner(jobs_settings, make_service, store, [], 0).run(job_id)) == "done"
    job = jobs_client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "failed"
    assert job["error"]["type"] == "worker_lost"
    assert job["finished_at"] is not None
    assert delivered_webhook(jobs_settings, job_id) == job


def never_ending(runners: list[JobRunner]) -> RenderStream:
    """A render call during which the replica starts stopping: the newest runner hands back."""

    async def render(_: list[SamplingJob], __: RenderInputs) -> AsyncIterator[list[RenderedImage]]:
        runners[-1].hand_back()
        await asyncio.Event().wait()  # until the runner stops the run
        yield []

    return render


def test_a_stopping_runner_queues_its_job_again_without_counting_the_run(
    jobs_client: TestClient,
    jobs_settings: ServiceSettings,
    make_service: MakeService,
    store: LocalImageStore,
    job_of_eight: str,
) -> None:
    before = queued_runs(jobs_settings)
    runners: list[JobRunner] = []
    # More hand-backs than the job has runs: a restart is not a failed run.
    for handed_back in range(1, jobs_settings.jobs_max_attempts + 2):
        service = make_service(jobs_settings, store, never_ending(runners))
        runners.append(job_runner(jobs_settings, service))
        # Queued again by the runner itself, not left to the stopping Celery consumer.
        assert asyncio.run(runners[-1].run(job_of_eight)) == "done"
        assert queued_runs(jobs_settings) == before + handed_back
    # A delivery that reaches a stopping runner goes back to the queue untouched.
    assert asyncio.run(runners[-1].run(job_of_eight)) == "done"
    assert queued_runs(jobs_settings) == before + len(runners) + 1
    assert jobs_client.get(f"/jobs/{job_of_eight}").json()["status"] == "running"
    rendered: list[int] = []
    runner = make_runner(jobs_settings, make_service, store, rendered)
    assert asyncio.run(runner.run(job_of_eight)) == "done"
    assert_made_once(jobs_client, store, job_of_eight, rendered)


@pytest.mark.parametrize("stall_after", [4, 8], ids=["mid-run", "before-the-end"])
def test_a_run_whose_lease_lapsed_while_it_stalled_still_ends_the_job(
    jobs_client: TestClient,
    jobs_settings: ServiceSettings,
    make_service: MakeService,
    store: LocalImageStore,
    job_of_eight: str,
    stall_after: int,
) -> None:
    """Nobody took the job over, so the slow runner keeps it: its result is the job's."""
    quick = jobs_settings.model_copy(update={"jobs_lease_s": 0.5})

    def stall(images: int) -> None:
        if images == stall_after:
            time.sleep(2)  # blocks the runner's event loop: no renewal, the lease lapses

    rendered: list[int] = []
    runner = make_runner(quick, make_service, store, rendered, after_batch=stall)
    assert asyncio.run(runner.run(job_of_eight)) == "done"
    assert_made_once(jobs_client, store, job_of_eight, rendered)


def test_redis_down_is_a_503_naming_the_broker_while_generate_works(
    jobs_settings: ServiceSettings,
    make_service: MakeService,
    store: LocalImageStore,
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    own = jobs_settings.model_copy(update={"redis_url": server.url})
    backend = JobBackend(job_store(own), CeleryJobQueue(own))
    try:
        with TestClient(create_app(make_service(own, store), always_ready, jobs=backend)) as c:
            assert c.post("/jobs", json=SMALL).status_code == 202
            server.kill()
            down = c.post("/jobs", json=SMALL)
            assert down.status_code == 503
            assert down.json()["error"]["type"] == "broker_unavailable"
            assert "Redis" in down.json()["error"]["message"]
            assert c.post("/generate", json=SMALL).status_code == 200
            health = c.get("/healthz")
            assert health.status_code == 503
            assert health.json()["detail"].startswith("jobs: the job broker (Redis")
            server.start()  # the same port and data: the first job is still there
            assert c.post("/jobs", json=SMALL).status_code == 202
            assert c.get("/healthz").status_code == 200
            assert queued_runs(own) == 2
    finally:
        server.stop()


def test_the_client_and_the_command_submit_follow_and_cancel_a_job(
    jobs_settings: ServiceSettings,
    make_service: MakeService,
    store: LocalImageStore,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from serve_app.client import FluxClient
    from serve_app.client.cli import main
    from serve_app.jobs.schemas import JobRequest

    from .live_server import serve_over_http

    backend = JobBackend(job_store(jobs_settings), CeleryJobQueue(jobs_settings))
    app = create_app(make_service(jobs_settings, store), always_ready, jobs=backend)
    with serve_over_http(app) as url, FluxClient(url) as client:
        job = client.submit(JobRequest(**SMALL), idempotency_key=f"cli-{time.time_ns()}")
        assert (job.status, job.progress.total) == ("queued", 4)
        assert client.job(job.id) == job
        assert main(["cancel", job.id, "--url", url]) == 0
        seen: list[str] = []
        ended = client.wait(job.id, timeout_s=30, on_progress=lambda j: seen.append(j.status))
        assert (ended.status, seen) == ("cancelled", ["cancelled"])
        capsys.readouterr()
        assert main(["submit", "a red cat", "-n", "2", "--url", url]) == 0
        submitted = capsys.readouterr().out.strip()
        assert client.job(submitted).status == "queued"
        assert main(["job", submitted, "--url", url]) == 0
        assert f'"id": "{submitted}"' in capsys.readouterr().out
        assert main(["submit", "x", "--webhook", "ftp://example.com", "--url", url]) == 2


def test_a_job_makes_images_from_an_input_image(
    jobs_client: TestClient,
    jobs_settings: ServiceSettings,
    make_service: MakeService,
    store: LocalImageStore,
) -> None:
    picture = encode(gradient(64, 64))
    body = {**SMALL, "nof_images": 2, "image": data_url(picture), "strength": 0.5}
    refused = jobs_client.post("/jobs", json={**body, "image": data_url(b"not an image")})
    assert refused.status_code == 422  # at submission, not as a failed job later
    assert refused.json()["error"]["param"] == "image"
    job_id = jobs_client.post("/jobs", json=body).json()["id"]
    rendered: list[int] = []
    asyncio.run(make_runner(jobs_settings, make_service, store, rendered).run(job_id))
    job = jobs_client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job
    digest = "sha256:" + hashlib.sha256(picture).hexdigest()
    assert {
        (i["sampling_params"]["image_digest"], i["sampling_params"]["strength"])
        for i in job["images"]
    } == {(digest, 0.5)}
