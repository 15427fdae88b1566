"""Shared fixtures: the tiny models, loaded once, and the application served in-process."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Settings are read once per process, at import: fix the test defaults before anything imports them.
os.environ.setdefault("FLUX_SERVE_CACHE_DIR", str(ROOT / "var" / "test-models"))
os.environ.setdefault("FLUX_SERVE_DEFAULT_WIDTH", "128")
os.environ.setdefault("FLUX_SERVE_DEFAULT_HEIGHT", "128")

from fastapi.testclient import TestClient  # noqa: E402

from serve_app.generation import FluxGenerator, RenderedImage, render_stream  # noqa: E402
from serve_app.http_api import Readiness, create_app  # noqa: E402
from serve_app.planning import SamplingJob  # noqa: E402
from serve_app.scoring import ClipScorer  # noqa: E402
from serve_app.service import GenerationService  # noqa: E402
from serve_app.settings import ServiceSettings, get_settings  # noqa: E402
from serve_app.storage import LocalImageStore  # noqa: E402


@pytest.fixture(scope="session")
def settings() -> ServiceSettings:
    return get_settings()


@pytest.fixture(scope="session")
def generator(settings: ServiceSettings) -> FluxGenerator:
    return FluxGenerator(settings)


@pytest.fixture(scope="session")
def scorer(settings: ServiceSettings) -> ClipScorer:
    return ClipScorer(settings)


@pytest.fixture
def store(tmp_path: Path) -> LocalImageStore:
    return LocalImageStore(tmp_path / "images", public_base_url=None)


@pytest.fixture
def service(
    settings: ServiceSettings, generator: FluxGenerator, scorer: ClipScorer, store: LocalImageStore
) -> GenerationService:
    """The request flow on in-process models: the same classes the deployments wrap."""

    def render(jobs: list[SamplingJob]) -> AsyncIterator[list[RenderedImage]]:
        return render_stream(generator, jobs)

    async def score(prompt: str, images: list[bytes]) -> list[float]:
        return scorer.score(prompt, images)

    return GenerationService(settings, render, score, store)


@pytest.fixture
def client(service: GenerationService) -> Iterator[TestClient]:
    async def ready() -> Readiness:
        return Readiness(ready=True, detail="ok")

    with TestClient(create_app(service, ready)) as test_client:
        yield test_client
