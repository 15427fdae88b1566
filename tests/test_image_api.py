"""Image inputs through POST /generate on the in-process app: results, and every refusal."""

from __future__ import annotations

import hashlib
import itertools
import pickle
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serve_app.api.routes import create_app
from serve_app.generation.pipeline import RenderedImage
from serve_app.generation.planning import SamplingJob
from serve_app.generation.scheduling import RenderScheduler
from serve_app.inputs import reading
from serve_app.inputs.pixels import RenderInputs
from serve_app.settings import ServiceSettings
from serve_app.storage.local import LocalImageStore

from .conftest import MakeService
from .https_server import ImageHost, answer, https_image_host, stalled
from .images import data_url, encode, gradient, pixels
from .live_server import always_ready

PICTURE = encode(gradient(100, 70))  # made at 96x64: its size rounded down to multiples of 16
PICTURE_URL = data_url(PICTURE)
DIGEST = "sha256:" + hashlib.sha256(PICTURE).hexdigest()


def mask_of(size: tuple[int, int]) -> bytes:
    """White (repaint) on the left half, black (keep) on the right."""
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))
    return encode(mask)


def generate(client: TestClient, **payload: object) -> dict[str, Any]:
    response = client.post("/generate", json={"prompt": "a red cat", **payload})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_image_to_image_records_the_inputs_digest_and_strength(client: TestClient) -> None:
    body = generate(client, image=PICTURE_URL, strength=0.6, nof_images=2)
    for image in body["images"]:
        params = image["sampling_params"]
        assert (params["width"], params["height"]) == (96, 64)
        assert (params["strength"], params["image_digest"], params["mask_digest"]) == (
            0.6,
            DIGEST,
            None,
        )
        assert pixels(client.get(image["url"]).content).shape == (64, 96, 3)
    assert PICTURE_URL[5:40] not in str(body)  # the input is not echoed


def test_the_same_request_again_reproduces_the_pixels(client: TestClient) -> None:
    request = {"image": PICTURE_URL, "nof_images": 2, "base_seed": 3}
    first, again = generate(client, **request), generate(client, **request)
    for one, other in zip(first["images"], again["images"], strict=True):
        assert one["sampling_params"] == other["sampling_params"]
        assert client.get(one["url"]).content == client.get(other["url"]).content


def test_width_and_height_fit_the_input_to_them(client: TestClient) -> None:
    body = generate(client, image=PICTURE_URL, width=64, height=128, nof_images=1)
    assert pixels(client.get(body["images"][0]["url"]).content).shape == (128, 64, 3)


def test_the_diversity_grid_runs_over_one_input(client: TestClient) -> None:
    diversity = {
        "samplers": ["euler", "heun", "dpmpp_2m"],
        "nof_steps": [1, 3],
        "cfg_scales": [1, 2],
    }
    body = generate(client, image=PICTURE_URL, nof_images=12, strength=0.5, diversity=diversity)
    made = {
        (p["sampler"], p["steps"], p["cfg_scale"])
        for p in (image["sampling_params"] for image in body["images"])
    }
    assert made == set(itertools.product(*diversity.values()))
    assert {image["sampling_params"]["strength"] for image in body["images"]} == {0.5}


def test_inpainting_keeps_the_input_where_the_mask_is_black(client: TestClient) -> None:
    picture = encode(gradient(96, 64))
    body = generate(client, image=data_url(picture), mask=data_url(mask_of((96, 64))), nof_images=1)
    params = body["images"][0]["sampling_params"]
    assert params["mask_digest"] == "sha256:" + hashlib.sha256(mask_of((96, 64))).hexdigest()
    made = pixels(client.get(body["images"][0]["url"]).content)
    assert np.array_equal(made[:, 48:], pixels(picture)[:, 48:])
    assert np.abs(made[:, :48] - pixels(picture)[:, :48]).mean() > 10


# Refusals, on a service with small limits that fetches from a real HTTPS host


@pytest.fixture
def host(tmp_path: Path) -> Iterator[ImageHost]:
    with https_image_host(tmp_path) as running:
        running.routes["/picture.png"] = answer(200, PICTURE)
        running.routes["/slow.png"] = stalled(running.stop)
        yield running


@pytest.fixture
def fetching_client(
    settings: ServiceSettings, make_service: MakeService, store: LocalImageStore, host: ImageHost
) -> Iterator[TestClient]:
    limited = settings.model_copy(
        update={
            "max_input_image_bytes": 64 * 1024,
            "max_input_image_pixels": 512 * 512,
            "image_url_hosts": ["localhost"],
            "image_url_private_hosts": True,  # the test host is on loopback
            "image_fetch_ca_file": host.ca_file,
            "image_fetch_timeout_s": 1.0,
        }
    )
    with TestClient(create_app(make_service(limited, store), always_ready)) as client:
        yield client


def test_an_image_url_on_the_allow_list_is_fetched(
    fetching_client: TestClient, host: ImageHost
) -> None:
    body = generate(fetching_client, image=host.at("/picture.png"), nof_images=1)
    assert body["images"][0]["sampling_params"]["image_digest"] == DIGEST


NOISE = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), np.uint8)))


@pytest.mark.parametrize(
    ("fields", "status", "param", "reason"),
    [
        pytest.param(
            {"image": "data:text/plain;base64,aGk="}, 422, "image", "unsupported", id="text-type"
        ),
        pytest.param(
            {"image": data_url(b"not an image at all")}, 422, "image", "not a PNG", id="not-image"
        ),
        pytest.param(
            {"image": data_url(encode(gradient(8, 8), "GIF"), "image/gif")},
            422,
            "image",
            "unsupported image format 'image/gif'",
            id="gif",
        ),
        pytest.param(
            {"image": data_url(NOISE)}, 422, "image", "over this service's limit", id="bytes"
        ),
        pytest.param(
            {"image": data_url(encode(Image.new("L", (600, 600))))},
            422,
            "image",
            "600x600 = 360000 pixels",
            id="pixels",
        ),
        pytest.param(
            {"image": PICTURE_URL, "mask": data_url(mask_of((64, 64)))},
            422,
            "mask",
            "must be the same size",
            id="mask-size",
        ),
        pytest.param(
            {"image": PICTURE_URL, "mask": "data:image/png;base64,!!"},
            422,
            "mask",
            "base64 is invalid",
            id="bad-mask",
        ),
        pytest.param({"mask": PICTURE_URL}, 422, "mask", "needs an image", id="mask-alone"),
        pytest.param({"strength": 0.5}, 422, "strength", "needs an image", id="strength-alone"),
        pytest.param(
            {"image": PICTURE_URL, "strength": 0}, 422, "strength", "greater than 0", id="zero"
        ),
        pytest.param(
            {"image": "http://localhost/picture.png"}, 422, "image", "pattern", id="plain-http"
        ),
        pytest.param(
            {"image": "https://images.example.com/cat.png"},
            422,
            "image",
            "'images.example.com' is not on this service's image hosts",
            id="host-not-allowed",
        ),
        pytest.param({"image": "/missing.png"}, 424, "image", "answered HTTP 404", id="404"),
        pytest.param({"image": "/slow.png"}, 424, "image", "took longer than 1 s", id="timeout"),
        pytest.param(
            {"image": PICTURE_URL, "mask": "/missing.png"},
            424,
            "mask",
            "answered HTTP 404",
            id="mask-404",
        ),
    ],
)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_bad_input_is_refused_with_its_status_and_field(
    fetching_client: TestClient,
    host: ImageHost,
    fields: dict[str, object],
    status: int,
    param: str,
    reason: str,
    stream: bool,
) -> None:
    # Paths stand for URLs on the test host, whose port is known only now.
    fields = {
        name: host.at(value) if isinstance(value, str) and value.startswith("/") else value
        for name, value in fields.items()
    }
    response = fetching_client.post(
        "/generate", json={"prompt": "a red cat", "nof_images": 1, "stream": stream, **fields}
    )
    # Refused before anything is streamed: a status, not an error event.
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert reason in error["message"]
    assert error["type"] == ("input_fetch_failed" if status == 424 else "invalid_request")


def test_the_input_is_read_once_and_carried_once_per_render_call(
    settings: ServiceSettings,
    make_service: MakeService,
    scheduler: RenderScheduler,
    store: LocalImageStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decoded: list[str] = []
    decode = reading.decode_image

    def counting_decode(*args: Any, **kwargs: Any) -> Any:
        decoded.append(args[1])
        return decode(*args, **kwargs)

    monkeypatch.setattr(reading, "decode_image", counting_decode)
    calls: list[tuple[list[SamplingJob], RenderInputs]] = []

    async def recording_render(
        jobs: list[SamplingJob], inputs: RenderInputs
    ) -> AsyncIterator[list[RenderedImage]]:
        calls.append((jobs, inputs))
        async for batch in scheduler.render(jobs, inputs):
            yield batch

    app = create_app(make_service(settings, store, recording_render), always_ready)
    with TestClient(app) as client:
        body = generate(client, image=PICTURE_URL, nof_images=8, gpus=2)
    assert body["count"] == 8
    assert decoded == ["image"]
    assert len(calls) == 2
    for jobs, inputs in calls:
        assert list(inputs.images) == [DIGEST]
        assert {job.params.image_digest for job in jobs} == {DIGEST}
        # The pixels travel with the call, once; the jobs only name them.
        assert len(pickle.dumps(inputs)) > 96 * 64 * 3
        assert len(pickle.dumps(jobs)) < 96 * 64
