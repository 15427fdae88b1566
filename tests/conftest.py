"""Shared fixtures: the tiny models, loaded once, and the application served in-process."""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Settings are read once per process, at import: fix the test defaults before anything imports them.
os.environ.setdefault("FLUX_SERVE_CACHE_DIR", str(ROOT / "var" / "test-models"))
os.environ.setdefault("FLUX_SERVE_DEFAULT_WIDTH", "128")
os.environ.setdefault("FLUX_SERVE_DEFAULT_HEIGHT", "128")

from fastapi.testclient import TestClient  # noqa: E402

from deployments.local_cluster import deploy, free_port, wait_until_ready  # noqa: E402
from serve_app.api.routes import create_app  # noqa: E402
from serve_app.generation.pipeline import FluxGenerator, RenderedImage  # noqa: E402
from serve_app.generation.planning import SamplingJob  # noqa: E402
from serve_app.generation.scheduling import RenderScheduler  # noqa: E402
from serve_app.inputs.pixels import RenderInputs  # noqa: E402
from serve_app.models.scoring import ClipScorer  # noqa: E402
from serve_app.service import GenerationService, RenderStream  # noqa: E402
from serve_app.settings import ServiceSettings, get_settings  # noqa: E402
from serve_app.storage.base import ImageStore  # noqa: E402
from serve_app.storage.local import LocalImageStore  # noqa: E402

from .live_server import always_ready, serve_over_http  # noqa: E402
from .redis_server import RedisServer  # noqa: E402
from .s3_server import SeaweedS3, credentials_env  # noqa: E402
from .server_process import running  # noqa: E402

# Signs the webhooks of every application the tests start; the receiver verifies with it.
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"flux-serve tests' webhook secret!").decode()


@pytest.fixture(scope="session")
def settings() -> ServiceSettings:
    return get_settings()


@pytest.fixture(scope="session")
def generator(settings: ServiceSettings) -> FluxGenerator:
    return FluxGenerator(settings)


@pytest.fixture(scope="session")
def scheduler(generator: FluxGenerator, settings: ServiceSettings) -> RenderScheduler:
    """What a FluxWorker replica runs its render calls on."""
    return RenderScheduler(
        generator,
        max_batch_size=settings.max_batch_size,
        across_calls=settings.batch_across_requests,
    )


@pytest.fixture(scope="session")
def scorer(settings: ServiceSettings) -> ClipScorer:
    return ClipScorer(settings)


@pytest.fixture
def store(tmp_path: Path) -> LocalImageStore:
    return LocalImageStore(tmp_path / "images", public_base_url=None)


class MakeService(Protocol):
    def __call__(
        self, settings: ServiceSettings, store: ImageStore, render_with: RenderStream | None = None
    ) -> GenerationService: ...


@pytest.fixture(scope="session")
def make_service(scheduler: RenderScheduler, scorer: ClipScorer) -> MakeService:
    """The request flow on in-process models (the classes the deployments wrap), for any settings
    and store."""

    def render(jobs: list[SamplingJob], inputs: RenderInputs) -> AsyncIterator[list[RenderedImage]]:
        return scheduler.render(jobs, inputs)

    async def score(prompt: str, images: list[bytes]) -> list[float]:
        return scorer.score(prompt, images)

    def make(
        settings: ServiceSettings, store: ImageStore, render_with: RenderStream | None = None
    ) -> GenerationService:
        return GenerationService(settings, render_with or render, score, store)

    return make


@pytest.fixture
def service(
    settings: ServiceSettings, make_service: MakeService, store: LocalImageStore
) -> GenerationService:
    return make_service(settings, store)


@pytest.fixture
def client(service: GenerationService) -> Iterator[TestClient]:
    with TestClient(create_app(service, always_ready)) as test_client:
        yield test_client


@dataclass(frozen=True)
class ServeCluster:
    """A Ray cluster owned by the test session, running config/serve.yaml's application."""

    url: str
    storage_dir: Path
    metrics_url: str
    redis: RedisServer
    config_path: Path
    gcs_address: str


# Jobs whose runner was killed come back within seconds, not minutes.
FAST_RECOVERY = {"FLUX_SERVE_JOBS_REDELIVERY_S": "6", "FLUX_SERVE_JOBS_LEASE_S": "3"}


def serve_config_for_tests(http_port: int, storage_dir: Path, redis_url: str) -> dict[str, Any]:
    """config/serve.yaml as shipped, with a free port, the test session's folders and Redis,
    webhooks to 127.0.0.1 allowed and retried briefly, and fast recovery of jobs whose runner
    died."""
    config = yaml.safe_load((ROOT / "config" / "serve.yaml").read_text())
    config["http_options"]["port"] = http_port
    application = config["applications"][0]
    env_vars = application["runtime_env"]["env_vars"]
    env_vars["FLUX_SERVE_STORAGE_DIR"] = str(storage_dir)
    env_vars["FLUX_SERVE_CACHE_DIR"] = os.environ["FLUX_SERVE_CACHE_DIR"]
    env_vars["FLUX_SERVE_REDIS_URL"] = redis_url
    env_vars["FLUX_SERVE_WEBHOOK_SECRET"] = WEBHOOK_SECRET
    env_vars["FLUX_SERVE_WEBHOOK_ALLOWED_HOSTS"] = "127.0.0.1"
    # Retried quickly and given up soon; a receiver that holds a delivery gets a minute.
    env_vars["FLUX_SERVE_WEBHOOK_BACKOFF_S"] = "1"
    env_vars["FLUX_SERVE_WEBHOOK_MAX_ATTEMPTS"] = "3"
    env_vars["FLUX_SERVE_WEBHOOK_TIMEOUT_S"] = "60"
    env_vars.update(FAST_RECOVERY)
    for deployment in application["deployments"]:
        policy = deployment.get("autoscaling_config", {}).get("policy")
        if policy:
            policy["policy_kwargs"]["broker_url"] = redis_url
    return config  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real Redis for the session (the jobs' broker, result store and records)."""
    with running(RedisServer(tmp_path_factory.mktemp("redis"))) as server:
        yield server


@pytest.fixture(scope="session")
def serve_cluster(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[ServeCluster]:
    """One Ray instance for the whole session, with two logical GPUs, serving config/serve.yaml.

    The application is deployed with the real ``serve run`` command against this cluster.
    """
    import ray
    from ray import serve

    from serve_app.client.cli import build_tiny_models

    # Build once here rather than racing in several replicas.
    build_tiny_models(get_settings().cache_dir)
    work = tmp_path_factory.mktemp("serve")
    port = free_port()
    config_path = work / "serve.yaml"
    config = serve_config_for_tests(port, work / "images", redis_server.url)
    config_path.write_text(yaml.safe_dump(config))
    metrics_port = free_port()
    # Custom metrics reach the export every second instead of every ten: tests poll less.
    os.environ["RAY_metrics_report_interval_ms"] = "1000"  # noqa: SIM112 - Ray spells it so
    # Logical CPUs beyond the two real ones let every replica schedule; GPUs are logical too.
    context = ray.init(
        address="local",
        num_cpus=8,
        num_gpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=metrics_port,
    )
    try:
        deploy(config_path, context.address_info["gcs_address"], ROOT)
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, timeout_s=240)
        yield ServeCluster(
            url=url,
            storage_dir=work / "images",
            metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
            redis=redis_server,
            config_path=config_path,
            gcs_address=context.address_info["gcs_address"],
        )
    finally:
        serve.shutdown()
        ray.shutdown()


@contextlib.contextmanager
def extra_application(name: str, env: dict[str, str], workers: int = 2) -> Iterator[str]:
    """Another application on the session's Ray instance (Ingress, ``workers`` FluxWorker
    replicas and a Scorer, no job consumers) with settings ``env``; yields its route prefix."""
    from ray import serve

    from deployments.flux_worker import FluxWorker
    from deployments.ingress import Ingress
    from deployments.scorer import Scorer

    options = {"num_cpus": 0.25, "num_gpus": 0, "runtime_env": {"env_vars": env}}
    app = Ingress.options(ray_actor_options=options).bind(
        FluxWorker.options(num_replicas=workers, ray_actor_options=options).bind(),
        Scorer.options(ray_actor_options=options).bind(),
        [],
    )
    serve.run(app, name=name, route_prefix=f"/{name}")
    try:
        yield f"/{name}"
    finally:
        serve.delete(name)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A real S3-compatible server on 127.0.0.1 for one test module, with its credentials in the
    environment (where boto3's chain finds them)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in credentials_env().items():
            patch.setenv(name, value)
        with running(SeaweedS3(tmp_path_factory.mktemp("seaweed"))) as server:
            yield server


@pytest.fixture
def live_url(service: GenerationService) -> Iterator[str]:
    """The in-process application over real HTTP (uvicorn on 127.0.0.1): its base URL."""
    with serve_over_http(create_app(service, always_ready)) as url:
        yield url
