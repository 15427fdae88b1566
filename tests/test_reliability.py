"""Overload, deadlines, cancellation, oversized bodies and lost workers, on the in-process app."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from serve_app.api.routes import create_app
from serve_app.faults import WorkerLost
from serve_app.generation.pipeline import FluxGenerator, RenderedImage
from serve_app.generation.planning import SamplingJob, plan_jobs
from serve_app.generation.scheduling import RenderScheduler
from serve_app.inputs.pixels import RenderInputs
from serve_app.schemas import GeneratedImage, GenerateRequest
from serve_app.service import Destination
from serve_app.settings import ServiceSettings
from serve_app.storage.local import LocalImageStore

from .conftest import MakeService
from .live_server import always_ready

SMALL = {"prompt": "a red cat", "width": 64, "height": 64}


def call(app: FastAPI, scenario: Callable[[httpx.AsyncClient], object]) -> object:
    """Run ``scenario`` against ``app`` in one event loop, as concurrent clients would."""

    async def run() -> object:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return await scenario(client)  # type: ignore[misc]

    return asyncio.run(run())


class HeldRender:
    """Renders for real, but only once released: lets a test hold a request in progress."""

    def __init__(self, scheduler: RenderScheduler) -> None:
        self.scheduler = scheduler
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = False

    async def __call__(
        self, jobs: list[SamplingJob], inputs: RenderInputs
    ) -> AsyncIterator[list[RenderedImage]]:
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        async for batch in self.scheduler.render(jobs, inputs):
            yield batch


def test_overload_is_answered_at_once_with_retry_after(
    settings: ServiceSettings,
    make_service: MakeService,
    store: LocalImageStore,
    scheduler: RenderScheduler,
) -> None:
    held = HeldRender(scheduler)
    limited = settings.model_copy(update={"max_concurrent_requests": 1, "retry_after_s": 7})
    app = create_app(make_service(limited, store, held), always_ready)

    async def scenario(client: httpx.AsyncClient) -> None:
        first = asyncio.create_task(client.post("/generate", json={**SMALL, "nof_images": 1}))
        await held.started.wait()
        refused = await client.post("/generate", json={**SMALL, "nof_images": 1})
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "7"
        assert refused.json()["error"]["type"] == "overloaded"
        held.release.set()
        assert (await first).status_code == 200
        # The slot is free again.
        assert (await client.post("/generate", json={**SMALL, "nof_images": 1})).status_code == 200

    call(app, scenario)


# Workers assumed fast enough for admission to let a request with a short deadline in: the
# deadline, not admission, is what these tests meet.
ADMITTED = {"admission_prior_speed": 1000.0}


def test_a_request_past_its_deadline_is_a_504_and_its_work_is_cancelled(
    settings: ServiceSettings,
    make_service: MakeService,
    store: LocalImageStore,
    scheduler: RenderScheduler,
) -> None:
    held = HeldRender(scheduler)  # never released: the work can't finish
    hasty = settings.model_copy(update={"request_timeout_s": 0.5, **ADMITTED})
    app = create_app(make_service(hasty, store, held), always_ready)

    async def scenario(client: httpx.AsyncClient) -> None:
        response = await client.post("/generate", json=SMALL)
        assert response.status_code == 504
        assert response.json()["error"]["type"] == "timeout"
        assert held.cancelled

    call(app, scenario)


def test_a_stream_past_its_deadline_ends_with_a_timeout_event(
    settings: ServiceSettings,
    make_service: MakeService,
    store: LocalImageStore,
    scheduler: RenderScheduler,
) -> None:
    held = HeldRender(scheduler)
    hasty = settings.model_copy(update={"request_timeout_s": 0.5, **ADMITTED})
    app = create_app(make_service(hasty, store, held), always_ready)

    async def scenario(client: httpx.AsyncClient) -> None:
        response = await client.post("/generate", json={**SMALL, "stream": True})
        assert response.status_code == 200
        assert "event: error" in response.text
        assert '"type":"timeout"' in response.text
        assert held.cancelled

    call(app, scenario)


def test_cancelling_a_request_stops_the_pipeline_at_its_next_step(
    settings: ServiceSettings,
    make_service: MakeService,
    store: LocalImageStore,
    generator: FluxGenerator,
) -> None:
    service = make_service(settings, store)
    # Fifty steps at 1024x1024 take far longer than the deadline below on this model.
    request = GenerateRequest.model_validate(
        {
            "prompt": "a red cat",
            "nof_images": 1,
            "width": 1024,
            "height": 1024,
            "diversity": {"nof_steps": [50]},
        }
    )

    async def scenario() -> None:
        task = asyncio.create_task(service.generate(request, "cancelled", "http://x", 0.0))
        deadline = time.monotonic() + 30
        while not generator._lock.locked():
            assert time.monotonic() < deadline, "the pipeline never started"
            await asyncio.sleep(0.01)
        task.cancel()  # what a client disconnect does to the request's task
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    deadline = time.monotonic() + 10
    while generator._lock.locked():
        assert time.monotonic() < deadline, "the pipeline kept running after cancellation"
        time.sleep(0.05)
    assert generator.pipeline.interrupt  # it was stopped, not run to its end


class HeldStore(LocalImageStore):
    """Stores for real (uploads run in threads), but holds one key's upload until released."""

    def __init__(self, root: Path, held_key_part: str) -> None:
        super().__init__(root, public_base_url=None)
        self.held_key_part = held_key_part
        self.entered = threading.Event()
        self.release = threading.Event()

    def put(self, key: str, data: bytes, content_type: str) -> None:
        if self.held_key_part in key:
            self.entered.set()
            self.release.wait(60)
        super().put(key, data, content_type)


def test_a_caller_that_stops_mid_batch_hears_of_every_image_stored(
    settings: ServiceSettings, make_service: MakeService, tmp_path: Path
) -> None:
    """What a job needs: the images it reports are exactly the images stored, also when it is
    cancelled while a batch is being uploaded."""
    store = HeldStore(tmp_path / "images", held_key_part="/0001-")
    service = make_service(settings, store)
    request = GenerateRequest.model_validate({**SMALL, "nof_images": 4})
    destination = Destination("stopped", "nonce", "http://x")
    heard: list[int] = []

    async def on_stored(image: GeneratedImage) -> None:
        heard.append(image.index)

    async def consume() -> None:
        jobs = plan_jobs(request, settings)
        async for _ in service.make_images(jobs, request, destination, None, on_stored):
            pass

    async def scenario() -> None:
        task = asyncio.create_task(consume())
        await asyncio.to_thread(store.entered.wait, 60)
        task.cancel()  # while image 1 is being written
        await asyncio.sleep(0)
        store.release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    stored = sorted(path.name for path in (tmp_path / "images" / "stopped").iterdir())
    assert len(stored) == 4  # one batch: all four uploads had started
    assert sorted(heard) == [0, 1, 2, 3]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_oversized_body_is_a_413(
    client_app: FastAPI, settings: ServiceSettings, chunked: bool
) -> None:
    body = b'{"prompt": "' + b"x" * settings.max_body_bytes + b'"}'

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 2**16):
            yield body[start : start + 2**16]

    async def scenario(client: httpx.AsyncClient) -> None:
        content = chunks() if chunked else body
        response = await client.post(
            "/generate", content=content, headers={"content-type": "application/json"}
        )
        assert response.status_code == 413
        assert response.json()["error"]["type"] in {"request_too_large", "http_error"}
        assert f"{settings.max_body_bytes} bytes" in response.json()["error"]["message"]

    call(client_app, scenario)


@pytest.fixture
def client_app(
    settings: ServiceSettings, make_service: MakeService, store: LocalImageStore
) -> FastAPI:
    return create_app(make_service(settings, store), always_ready)


class LosesAWorker:
    """Renders for real; the first stream dies after its first batch, like a killed replica."""

    def __init__(self, scheduler: RenderScheduler, losses: int) -> None:
        self.scheduler = scheduler
        self.losses = losses
        self.calls: list[list[int]] = []

    async def __call__(
        self, jobs: list[SamplingJob], inputs: RenderInputs
    ) -> AsyncIterator[list[RenderedImage]]:
        self.calls.append([job.index for job in jobs])
        async for batch in self.scheduler.render(jobs, inputs):
            yield batch
            if self.losses:
                self.losses -= 1
                raise WorkerLost("a FluxWorker replica was lost: ActorDiedError")


def test_jobs_of_a_lost_worker_are_retried_and_stored_once(
    settings: ServiceSettings,
    make_service: MakeService,
    store: LocalImageStore,
    scheduler: RenderScheduler,
) -> None:
    flaky = LosesAWorker(scheduler, losses=1)
    quick = settings.model_copy(update={"retry_backoff_s": 0})
    app = create_app(make_service(quick, store, flaky), always_ready)

    async def scenario(client: httpx.AsyncClient) -> None:
        response = await client.post("/generate", json={**SMALL, "nof_images": 8})
        assert response.status_code == 200, response.text
        body = response.json()
        assert sorted(image["index"] for image in body["images"]) == list(range(8))
        stored = list(Path(store.root, body["request_id"]).iterdir())
        assert len(stored) == 8

    call(app, scenario)
    # The first call made one batch of 4 and died; only the 4 jobs left went again.
    assert flaky.calls == [list(range(8)), [4, 5, 6, 7]]


def test_a_worker_lost_for_good_is_a_503_after_the_retries(
    settings: ServiceSettings,
    make_service: MakeService,
    store: LocalImageStore,
    scheduler: RenderScheduler,
) -> None:
    doomed = LosesAWorker(scheduler, losses=100)
    quick = settings.model_copy(update={"retry_backoff_s": 0, "max_retries": 2})
    app = create_app(make_service(quick, store, doomed), always_ready)

    async def scenario(client: httpx.AsyncClient) -> None:
        response = await client.post("/generate", json={**SMALL, "nof_images": 16})
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "worker_lost"
        assert response.headers["Retry-After"] == str(settings.retry_after_s)

    call(app, scenario)
    assert len(doomed.calls) == 3  # the first try and two retries
