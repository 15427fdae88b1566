"""The S3 backend against a real S3-compatible server (SeaweedFS) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serve_app.api.routes import create_app
from serve_app.generation.pipeline import RenderedImage
from serve_app.generation.planning import SamplingJob
from serve_app.generation.scheduling import RenderScheduler
from serve_app.inputs.pixels import RenderInputs
from serve_app.settings import ServiceSettings
from serve_app.storage.base import StorageError
from serve_app.storage.s3 import S3ImageStore

from .conftest import MakeService
from .live_server import always_ready
from .s3_server import REGION, SeaweedS3
from .sse import parse_events

REQUEST = {"prompt": "a red cat", "width": 64, "height": 64}


@pytest.fixture
def bucket(s3: SeaweedS3) -> str:
    name = f"flux-{uuid.uuid4().hex[:10]}"
    s3.client().create_bucket(Bucket=name)
    return name


SettingsFor = Callable[..., ServiceSettings]


@pytest.fixture
def s3_settings(settings: ServiceSettings, s3: SeaweedS3, bucket: str) -> SettingsFor:
    def make(**changes: object) -> ServiceSettings:
        return settings.model_copy(
            update={
                "storage_backend": "s3",
                "s3_bucket": bucket,
                "s3_endpoint_url": s3.endpoint,
                "s3_region": REGION,
                "s3_addressing_style": "path",
                "s3_prefix": "images/",
                "s3_max_attempts": 2,
                **changes,
            }
        )

    return make


@pytest.fixture
def api(s3_settings: SettingsFor, make_service: MakeService) -> Callable[..., TestClient]:
    """A client of the API storing in S3 with the given settings changes."""
    clients: list[TestClient] = []

    def make(**changes: object) -> TestClient:
        settings = s3_settings(**changes)
        client = TestClient(
            create_app(make_service(settings, S3ImageStore(settings)), always_ready)
        )
        clients.append(client)
        return client

    return make


def generate(client: TestClient, **payload: object) -> dict:  # type: ignore[type-arg]
    response = client.post("/generate", json={**REQUEST, **payload})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_presigned_urls_fetch_the_stored_images(
    api: Callable[..., TestClient], s3: SeaweedS3, bucket: str
) -> None:
    body = generate(api(), nof_images=3)
    keys = s3.keys(bucket, f"images/{body['request_id']}/")
    assert len(keys) == 3
    for image in body["images"]:
        assert "X-Amz-Signature=" in image["url"]
        fetched = httpx.get(image["url"])
        assert fetched.status_code == 200
        assert fetched.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(fetched.content)).size == (64, 64)


def test_a_tampered_presigned_url_is_refused(api: Callable[..., TestClient]) -> None:
    url = generate(api(), nof_images=1)["images"][0]["url"]
    other_key = url.replace("0000-", "0001-", 1)
    assert other_key != url
    assert httpx.get(other_key).status_code == 403
    signature_at = url.index("X-Amz-Signature=") + len("X-Amz-Signature=")
    flipped = "0" if url[signature_at] != "0" else "1"
    assert httpx.get(url[:signature_at] + flipped + url[signature_at + 1 :]).status_code == 403


def test_public_urls_under_the_buckets_address(
    api: Callable[..., TestClient], s3: SeaweedS3, bucket: str
) -> None:
    body = generate(api(s3_url_mode="public"), nof_images=2)
    for image in body["images"]:
        assert image["url"].startswith(f"{s3.endpoint}/{bucket}/images/{body['request_id']}/")
        assert "Signature" not in image["url"]
        assert httpx.get(image["url"]).status_code == 200


def test_public_urls_under_a_cdn_base(api: Callable[..., TestClient]) -> None:
    body = generate(api(s3_url_mode="public", public_base_url="https://cdn.example.com/"))
    assert body["images"][0]["url"].startswith("https://cdn.example.com/images/")


@pytest.mark.parametrize(
    ("image_format", "content_type", "pil_format"),
    [("jpeg", "image/jpeg", "JPEG"), ("webp", "image/webp", "WEBP"), ("png", "image/png", "PNG")],
)
def test_every_object_has_its_content_type(
    api: Callable[..., TestClient],
    s3: SeaweedS3,
    bucket: str,
    image_format: str,
    content_type: str,
    pil_format: str,
) -> None:
    body = generate(api(image_format=image_format), nof_images=1)
    (key,) = s3.keys(bucket, f"images/{body['request_id']}/")
    assert key.endswith(f".{image_format}")
    head = s3.client().head_object(Bucket=bucket, Key=key)
    assert head["ContentType"] == content_type
    fetched = httpx.get(body["images"][0]["url"])
    assert Image.open(io.BytesIO(fetched.content)).format == pil_format


def test_top_k_uploads_only_k_objects(
    api: Callable[..., TestClient], s3: SeaweedS3, bucket: str
) -> None:
    body = generate(api(), nof_images=6, top_k=2)
    assert body["count"] == 2
    assert len(s3.keys(bucket, "images/")) == 2


def test_streaming_announces_stored_images(
    api: Callable[..., TestClient], s3: SeaweedS3, bucket: str
) -> None:
    with api().stream("POST", "/generate", json={**REQUEST, "nof_images": 3, "stream": True}) as r:
        events = parse_events(r.iter_lines())
    images = [data for name, data in events if name == "image"]
    assert len(images) == 3
    assert events[-1][0] == "result"
    for image in images:
        assert httpx.get(str(image["url"])).status_code == 200
    assert len(s3.keys(bucket, "images/")) == 3


def test_an_existing_object_is_never_overwritten(s3_settings: SettingsFor, s3: SeaweedS3) -> None:
    store = S3ImageStore(s3_settings())
    store.put("r/0000-a.png", b"first", "image/png")
    store.put("r/0000-a.png", b"second", "image/png")  # a retry of a write that landed
    stored = s3.client().get_object(Bucket=store.bucket, Key="images/r/0000-a.png")
    assert stored["Body"].read() == b"first"


def test_wrong_credentials_fail_the_start_check_naming_the_bucket(
    s3_settings: SettingsFor, monkeypatch: pytest.MonkeyPatch, bucket: str
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageError, match=rf"bucket '{bucket}'.*access denied"):
        S3ImageStore(s3_settings()).check()


def test_a_missing_bucket_makes_healthz_unready(
    s3_settings: SettingsFor, make_service: MakeService
) -> None:
    settings = s3_settings(s3_bucket="no-such-bucket")
    client = TestClient(create_app(make_service(settings, S3ImageStore(settings)), always_ready))
    response = client.get("/healthz")
    assert response.status_code == 503
    assert "'no-such-bucket'" in response.json()["detail"]
    assert "does not exist" in response.json()["detail"]


def test_the_server_going_away_mid_request_is_a_503(
    s3_settings: SettingsFor,
    s3: SeaweedS3,
    bucket: str,
    scheduler: RenderScheduler,
    make_service: MakeService,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = s3_settings()
    assert scheduler.generator.settings.max_batch_size == 4  # so 8 images come in two batches

    async def first_batch_stored() -> None:
        deadline = time.monotonic() + 30
        while len(await asyncio.to_thread(s3.keys, bucket, "images/")) < 4:
            assert time.monotonic() < deadline, "the first batch was never stored"
            await asyncio.sleep(0.05)

    async def render_then_lose_the_server(
        jobs: list[SamplingJob], inputs: RenderInputs
    ) -> AsyncIterator[list[RenderedImage]]:
        async for batch in scheduler.render(jobs, inputs):
            if batch[0].job.index > 0:
                await first_batch_stored()
                s3.kill()
            yield batch

    service = make_service(settings, S3ImageStore(settings), render_then_lose_the_server)
    client = TestClient(create_app(service, always_ready))
    try:
        with caplog.at_level(logging.ERROR, logger="serve_app.service"):
            response = client.post("/generate", json={**REQUEST, "nof_images": 8})
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["type"] == "storage_error"
        assert "4 of 4 images could not be stored" in error["message"]
        lost = [r.getMessage() for r in caplog.records if "was not stored" in r.getMessage()]
        assert sorted(int(message.split()[1]) for message in lost) == [4, 5, 6, 7]
    finally:
        s3.start()
    # The first batch was stored before the server went away, and nothing else.
    assert len(s3.keys(bucket, "images/")) == 4


def test_settings_refuse_s3_without_a_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUX_SERVE_STORAGE_BACKEND", "s3")
    with pytest.raises(ValueError, match="FLUX_SERVE_S3_BUCKET"):
        ServiceSettings()


def test_local_store_check_names_the_folder(tmp_path: Path) -> None:
    from serve_app.storage.local import LocalImageStore

    store = LocalImageStore(tmp_path / "images", None)
    store.check()
    (tmp_path / "images").rmdir()
    (tmp_path / "images").write_bytes(b"not a folder")
    with pytest.raises(StorageError, match=str(tmp_path / "images")):
        store.check()
