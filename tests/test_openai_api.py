"""The OpenAI-compatible API, spoken by the official ``openai`` SDK: on the in-process application
over HTTP, and on the real cluster (the tests marked ray)."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import numpy as np
import openai
import pytest
from PIL import Image
from pydantic import SecretStr

from serve_app.api.routes import create_app
from serve_app.generation.scheduling import RenderScheduler
from serve_app.service import GenerationService
from serve_app.settings import ServiceSettings
from serve_app.storage.local import LocalImageStore
from serve_app.telemetry import NoTelemetry, Outcome

from .conftest import MakeService, ServeCluster
from .images import encode, gradient, mean_abs_difference, pixels
from .live_server import always_ready, serve_over_http
from .test_reliability import HeldRender


def sdk(base_url: str, api_key: str = "unused") -> openai.OpenAI:
    """The official client as an application would make it, pointed at us; it also checks every
    answer against its own response types, and does not retry, so that each error shows."""
    return openai.OpenAI(
        base_url=f"{base_url}/v1",
        api_key=api_key,
        max_retries=0,
        _strict_response_validation=True,
    )


def picture(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


@pytest.fixture
def client(live_url: str) -> openai.OpenAI:
    return sdk(live_url)


def test_urls_open_as_images_of_the_asked_size(client: openai.OpenAI) -> None:
    answer = client.images.generate(prompt="a red cat", n=2, size="64x128")
    assert answer.size == "64x128"
    assert answer.output_format == "png"
    assert answer.data is not None
    assert len(answer.data) == 2
    assert len({image.url for image in answer.data}) == 2
    for image in answer.data:
        assert image.url is not None
        assert image.b64_json is None
        fetched = httpx.get(image.url, timeout=30)
        assert fetched.headers["content-type"] == "image/png"
        assert (picture(fetched.content).format, picture(fetched.content).size) == (
            "PNG",
            (64, 128),
        )


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
def test_b64_json_decodes_to_the_asked_format_and_nothing_is_stored(
    client: openai.OpenAI, store: LocalImageStore, output_format: Any
) -> None:
    answer = client.images.generate(
        prompt="a red cat", response_format="b64_json", output_format=output_format, size="auto"
    )
    assert answer.data is not None
    [image] = answer.data
    assert image.url is None
    assert image.b64_json is not None
    decoded = picture(base64.b64decode(image.b64_json))
    assert decoded.format == output_format.upper()
    assert decoded.size == (128, 128)  # the tests' default size: what "auto" means
    assert (answer.size, answer.output_format) == ("128x128", output_format)
    assert not store.root.exists() or not any(store.root.iterdir())


def inline(client: openai.OpenAI, **fields: Any) -> bytes:
    """The one image of a b64_json request, decoded."""
    extra = {key: fields.pop(key) for key in ("seed", "steps", "sampler") if key in fields}
    answer = client.images.generate(
        prompt="a red cat", size="64x64", response_format="b64_json", extra_body=extra, **fields
    )
    assert answer.data is not None
    assert answer.data[0].b64_json is not None
    return base64.b64decode(answer.data[0].b64_json)


def test_output_compression_trades_detail_for_size(client: openai.OpenAI) -> None:
    small = inline(client, output_format="jpeg", output_compression=5, seed=3)
    large = inline(client, output_format="jpeg", output_compression=100, seed=3)
    assert picture(small).format == picture(large).format == "JPEG"
    assert len(small) < len(large)


def test_the_seed_extension_reproduces_images_and_steps_change_them(
    client: openai.OpenAI,
) -> None:
    first = inline(client, seed=11)
    assert mean_abs_difference(first, inline(client, seed=11)) == 0
    assert mean_abs_difference(first, inline(client, seed=12)) > 0
    assert mean_abs_difference(first, inline(client, seed=11, steps=2)) > 0
    assert mean_abs_difference(first, inline(client, seed=11, sampler="dpmpp_2m")) > 0
    # Without a seed, as at OpenAI, every call draws new ones.
    assert mean_abs_difference(inline(client), inline(client)) > 0


# The fields generations and edits share, refused alike by both.
FIELD_REFUSALS = [
    pytest.param({"size": "100x100"}, "size", "multiple of 16", id="size-not-16"),
    pytest.param({"size": "4096x4096"}, "size", "from 64 to 2048", id="size-too-large"),
    pytest.param({"size": "large"}, "size", "WIDTHxHEIGHT", id="size-not-a-size"),
    pytest.param({"model": "dall-e-3"}, "model", "the served model is 'tiny'", id="model"),
    pytest.param({"n": 0}, "n", "greater than or equal to 1", id="n-zero"),
    pytest.param({"n": 65}, "n", "less than or equal to 64", id="n-too-many"),
    pytest.param({"prompt": "   "}, "prompt", "String should", id="blank-prompt"),
    pytest.param({"output_format": "gif"}, "output_format", "'webp'", id="gif"),
    pytest.param({"response_format": "html"}, "response_format", "'b64_json'", id="format"),
    pytest.param({"output_compression": 101}, "output_compression", "100", id="compression"),
    pytest.param({"background": "transparent"}, "background", "opaque", id="transparent"),
    pytest.param({"quality": "ultra"}, "quality", "'hd'", id="quality"),
    pytest.param({"stream": True}, "stream", "POST /generate", id="stream"),
    pytest.param({"user": "u" * 300}, "user", "at most 256", id="user-too-long"),
    pytest.param({"extra_body": {"sampler": "ddim"}}, "sampler", "dpmpp_2m", id="sampler"),
    pytest.param({"extra_body": {"steps": 65}}, "steps", "less than or equal", id="steps"),
    pytest.param({"extra_body": {"guidance": 0.5}}, "guidance", "greater", id="guidance"),
    pytest.param({"extra_body": {"frame_count": 3}}, "frame_count", "Extra", id="unknown"),
]


@pytest.mark.parametrize("endpoint", ["generations", "edits"])
@pytest.mark.parametrize(("fields", "param", "says"), FIELD_REFUSALS)
def test_bad_input_raises_bad_request_naming_the_field(
    client: openai.OpenAI, endpoint: str, fields: dict[str, Any], param: str, says: str
) -> None:
    request: dict[str, Any] = {"prompt": "a red cat", **fields}
    if endpoint == "edits":
        request["image"] = png("cat.png", PICTURE)
    call = client.images.edit if endpoint == "edits" else client.images.generate
    with pytest.raises(openai.BadRequestError) as raised:
        call(**request)
    error = raised.value
    assert error.status_code == 400
    assert (error.type, error.param) == ("invalid_request_error", param)
    assert isinstance(error.body, dict)
    assert says in error.body["message"]
    assert error.body["message"].startswith(f"{param}: ")


# Edits: multipart forms of an image, a mask in OpenAI's convention, and the fields of generations

PICTURE = encode(gradient(100, 70))  # edited at 96x64: its size rounded down to multiples of 16


def png(name: str, data: bytes) -> tuple[str, bytes, str]:
    """A file as the SDK uploads it."""
    return (name, data, "image/png")


def openai_mask(size: tuple[int, int], edit_width: int) -> bytes:
    """OpenAI's convention: transparent (edited) on the left ``edit_width`` pixels, opaque (kept)
    elsewhere; the colours carry nothing."""
    mask = Image.new("RGBA", size, (255, 255, 255, 255))
    mask.paste((0, 0, 0, 0), (0, 0, edit_width, size[1]))
    return encode(mask)


def edited(client: openai.OpenAI, **fields: Any) -> list[bytes]:
    """The images of a b64_json edit of PICTURE, decoded; extensions go in extra_body."""
    extra = {key: fields.pop(key) for key in ("seed", "strength", "steps") if key in fields}
    answer = client.images.edit(
        image=fields.pop("image", None) or png("cat.png", PICTURE),
        prompt="a red cat",
        response_format="b64_json",
        extra_body=extra,
        **fields,
    )
    assert answer.data is not None
    return [base64.b64decode(str(image.b64_json)) for image in answer.data]


def test_an_edit_makes_n_images_of_the_asked_size_unlike_text_to_image(
    client: openai.OpenAI,
) -> None:
    answer = client.images.edit(
        image=png("cat.png", PICTURE), prompt="a red cat", n=2, size="64x128"
    )
    assert (answer.size, answer.output_format) == ("64x128", "png")
    assert answer.data is not None
    assert len(answer.data) == 2
    for image in answer.data:
        fetched = httpx.get(str(image.url), timeout=30)
        assert picture(fetched.content).size == (64, 128)
    edits = edited(client, n=2, size="64x128", seed=5)
    texts = client.images.generate(
        prompt="a red cat", n=2, size="64x128", response_format="b64_json", extra_body={"seed": 5}
    ).data
    assert texts is not None
    for edit, text in zip(edits, texts, strict=True):
        assert picture(edit).size == (64, 128)
        assert mean_abs_difference(edit, base64.b64decode(str(text.b64_json))) > 5
    assert edits == edited(client, n=2, size="64x128", seed=5)  # a seed reproduces an edit


def test_an_edit_without_a_size_takes_the_images_and_strength_steers_it(
    client: openai.OpenAI,
) -> None:
    other = png("other.png", encode(gradient(100, 70, turned=True)))
    [light, light_other] = [edited(client, image=i, seed=3, strength=0.3)[0] for i in (None, other)]
    assert picture(light).size == (96, 64)
    assert mean_abs_difference(light, light_other) > 1  # the input shows through
    # At full strength the input is ignored: the pipeline starts from pure noise.
    [full, full_other] = [edited(client, image=i, seed=3, strength=1.0)[0] for i in (None, other)]
    assert mean_abs_difference(full, full_other) == 0


def test_inpainting_keeps_the_image_where_the_mask_is_opaque(client: openai.OpenAI) -> None:
    source = encode(gradient(96, 64))
    [made] = edited(
        client, image=png("cat.png", source), mask=png("m.png", openai_mask((96, 64), 48))
    )
    assert np.array_equal(pixels(made)[:, 48:], pixels(source)[:, 48:])
    assert np.abs(pixels(made)[:, :48] - pixels(source)[:, :48]).mean() > 10


PROMPT = {"prompt": "a red cat"}


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        pytest.param(
            {"data": PROMPT, "files": [("image", png("a.png", PICTURE))] * 2},
            "image",
            "2 images were sent",
            id="the-field-twice",
        ),
        pytest.param({"json": PROMPT}, None, "send the body as a multipart form", id="json"),
        pytest.param(
            {"data": {**PROMPT, "image": "https://example.com/cat.png"}},
            None,
            "send the body as a multipart form",
            id="url-encoded",
        ),
    ],
)
def test_what_clients_other_than_the_sdk_may_send(
    live_url: str, body: dict[str, Any], param: str | None, says: str
) -> None:
    response = httpx.post(f"{live_url}/v1/images/edits", timeout=30, **body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert says in error["message"]


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        pytest.param({"image": []}, "image", "send the image to edit", id="no-image"),
        pytest.param(
            {"image": png("cat.png", b"not an image")}, "image", "is not a PNG", id="not-an-image"
        ),
        pytest.param(
            {"image": [png("a.png", PICTURE), png("b.png", PICTURE)]},
            "image",
            "2 images were sent",
            id="two-images",
        ),
        pytest.param(
            {"mask": png("m.png", encode(Image.new("L", (100, 70), 255)))},
            "mask",
            "no alpha channel",
            id="mask-without-alpha",
        ),
        pytest.param(
            {"mask": png("m.png", openai_mask((64, 64), 32))},
            "mask",
            "the mask is 64x64 and the image 100x70",
            id="mask-of-another-size",
        ),
        pytest.param(
            {"mask": png("m.png", b"GIF89a")}, "mask", "is not a PNG", id="mask-not-an-image"
        ),
        pytest.param({"extra_body": {"strength": 0}}, "strength", "greater than 0", id="strength"),
        pytest.param({"extra_body": {"seed": "seven"}}, "seed", "valid integer", id="seed"),
    ],
)
def test_a_bad_edit_raises_bad_request_naming_the_field(
    client: openai.OpenAI, fields: dict[str, Any], param: str, says: str
) -> None:
    request: dict[str, Any] = {"image": png("cat.png", PICTURE), "prompt": "a red cat", **fields}
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.edit(**request)
    error = raised.value
    assert error.status_code == 400
    assert (error.type, error.param) == ("invalid_request_error", param)
    assert says in error.message


def test_models_lists_and_retrieves_the_served_model(
    client: openai.OpenAI, settings: ServiceSettings
) -> None:
    assert [model.id for model in client.models.list()] == [settings.served_model] == ["tiny"]
    model = client.models.retrieve("tiny")
    assert (model.id, model.owned_by) == ("tiny", "flux-serve")
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("black-forest-labs/FLUX.1-dev")
    assert raised.value.code == "model_not_found"


def test_an_unknown_v1_path_is_a_404_in_openais_envelope(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.type == "invalid_request_error"


def test_an_oversized_body_is_a_413_in_openais_envelope(
    settings: ServiceSettings, make_service: MakeService, store: LocalImageStore
) -> None:
    # A small limit: the default one holds input images, far more than a prompt can fill.
    small = settings.model_copy(update={"max_body_bytes": 65536})
    app = create_app(make_service(small, store), always_ready)
    with serve_over_http(app) as url:
        with pytest.raises(openai.APIStatusError) as raised:
            sdk(url).images.generate(prompt="x" * 70_000)
        assert raised.value.status_code == 413
        assert raised.value.code == "request_too_large"
        with pytest.raises(openai.APIStatusError) as raised:
            sdk(url).images.edit(image=png("big.png", bytes(70_000)), prompt="a red cat")
        assert raised.value.status_code == 413
        assert raised.value.code == "request_too_large"


def test_the_request_id_is_echoed_and_names_the_stored_images(client: openai.OpenAI) -> None:
    raw = client.images.with_raw_response.generate(
        prompt="a red cat", size="64x64", extra_headers={"X-Request-Id": "oa-4711"}
    )
    assert raw.headers["x-request-id"] == "oa-4711"
    answer = raw.parse()
    assert answer._request_id == "oa-4711"
    assert answer.data is not None
    assert "/images/oa-4711/" in str(answer.data[0].url)


def test_the_end_user_is_logged_with_the_request_id_never_with_the_prompt(
    client: openai.OpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    for request_id, ids in [("oa-u1", {"user": "u-42"}), ("oa-u2", {"safety_identifier": "s-7"})]:
        client.images.generate(
            prompt="a secret prompt",
            size="64x64",
            extra_headers={"X-Request-Id": request_id},
            **ids,  # type: ignore[arg-type]
        )
    lines = [record.getMessage() for record in caplog.records if record.levelno >= logging.INFO]
    assert any("oa-u1" in line and "'u-42'" in line for line in lines)
    assert any("oa-u2" in line and "'s-7'" in line for line in lines)
    assert not any("a secret prompt" in line for line in lines)


KEYS = ["first-key", "second-key"]


@pytest.fixture
def locked_url(
    settings: ServiceSettings, make_service: MakeService, store: LocalImageStore
) -> Iterator[str]:
    keyed = settings.model_copy(update={"api_keys": [SecretStr(key) for key in KEYS]})
    with serve_over_http(create_app(make_service(keyed, store), always_ready)) as url:
        yield url


@pytest.mark.parametrize(
    "key", ["wrong", "first-ke", "SECOND-KEY"], ids=["wrong", "prefix", "case"]
)
def test_a_wrong_key_raises_authentication_error(locked_url: str, key: str) -> None:
    client = sdk(locked_url, api_key=key)
    with pytest.raises(openai.AuthenticationError) as raised:
        client.images.generate(prompt="a red cat", size="64x64")
    assert raised.value.code == "authentication_error"
    assert raised.value.response.headers["www-authenticate"].startswith("Bearer")
    with pytest.raises(openai.AuthenticationError):
        client.images.edit(image=png("cat.png", PICTURE), prompt="a red cat")
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


@pytest.mark.parametrize("key", KEYS)
def test_a_valid_key_is_admitted(locked_url: str, key: str) -> None:
    client = sdk(locked_url, api_key=key)
    answer = client.images.generate(prompt="a red cat", size="64x64")
    assert answer.data is not None
    assert len(answer.data) == 1
    edit = client.images.edit(image=png("cat.png", PICTURE), prompt="a red cat", size="64x64")
    assert edit.data is not None
    assert len(edit.data) == 1


def test_one_admission_for_both_apis_and_overload_is_a_503_with_retry_after(
    settings: ServiceSettings,
    make_service: MakeService,
    store: LocalImageStore,
    scheduler: RenderScheduler,
) -> None:
    held = HeldRender(scheduler)
    one_at_a_time = settings.model_copy(update={"max_concurrent_requests": 1, "retry_after_s": 3})
    app = create_app(make_service(one_at_a_time, store, held), always_ready)

    async def scenario() -> None:
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as http:
            client = openai.AsyncOpenAI(
                base_url="http://testserver/v1", api_key="unused", max_retries=0, http_client=http
            )
            # A request of our own API holds the only slot...
            native = {"prompt": "a red cat", "nof_images": 1, "width": 64, "height": 64}
            holding = asyncio.create_task(http.post("/generate", json=native))
            await held.started.wait()
            # ...so the OpenAI-shaped one is refused at once.
            with pytest.raises(openai.InternalServerError) as raised:
                await client.images.generate(prompt="a red cat", size="64x64")
            assert raised.value.status_code == 503
            assert raised.value.response.headers["retry-after"] == "3"
            assert (raised.value.type, raised.value.code) == ("server_error", "overloaded")
            with pytest.raises(openai.InternalServerError) as raised:
                await client.images.edit(image=png("cat.png", PICTURE), prompt="a red cat")
            assert (raised.value.status_code, raised.value.code) == (503, "overloaded")
            assert raised.value.response.headers["retry-after"] == "3"
            held.release.set()
            assert (await holding).status_code == 200
            answer = await client.images.generate(prompt="a red cat", size="64x64")
            assert answer.data is not None

    asyncio.run(scenario())


class CountsOutcomes(NoTelemetry):
    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []

    def request_finished(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)


def test_image_requests_are_counted_like_generate_ones(service: GenerationService) -> None:
    telemetry = CountsOutcomes()
    service.telemetry = telemetry
    with serve_over_http(create_app(service, always_ready)) as url:
        client = sdk(url)
        client.images.generate(prompt="a red cat", size="64x64")
        with pytest.raises(openai.BadRequestError):
            client.images.generate(prompt="a red cat", size="65x64")
        client.images.edit(image=png("cat.png", PICTURE), prompt="a red cat", size="64x64")
        with pytest.raises(openai.BadRequestError):
            client.images.edit(image=png("cat.png", b"not an image"), prompt="a red cat")
        client.models.list()  # not an image request
    assert telemetry.outcomes == ["success", "client_error", "success", "client_error"]


def test_the_openapi_schema_documents_every_field(live_url: str) -> None:
    schema = httpx.get(f"{live_url}/openapi.json", timeout=30).json()
    request = schema["components"]["schemas"]["ImageGenerationRequest"]
    assert request["additionalProperties"] is False
    assert {"model", "n", "size", "response_format", "seed", "steps"} <= set(request["properties"])
    for name, field in request["properties"].items():
        assert field.get("description"), name
    edit = schema["components"]["schemas"]["ImageEditRequest"]
    assert edit["additionalProperties"] is False
    assert {"image", "image[]", "mask", "prompt", "n", "size", "strength"} <= set(
        edit["properties"]
    )
    for name, field in edit["properties"].items():
        assert field.get("description"), name
    body = schema["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    assert body["multipart/form-data"]["schema"]["$ref"].endswith("ImageEditRequest")
    for path in ("/v1/images/generations", "/v1/images/edits"):
        errors = schema["paths"][path]["post"]["responses"]
        assert errors["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "OpenAIErrorEnvelope"
        )


@pytest.mark.ray
def test_the_sdk_against_the_cluster(serve_cluster: ServeCluster) -> None:
    client = sdk(serve_cluster.url)
    assert [model.id for model in client.models.list()] == ["tiny"]

    raw = client.images.with_raw_response.generate(
        prompt="a red cat", n=2, size="64x128", extra_headers={"X-Request-Id": "oa-cluster-1"}
    )
    assert "oa-cluster-1" in raw.headers["x-request-id"]
    answer = raw.parse()
    assert answer.data is not None
    assert len(answer.data) == 2
    for image in answer.data:
        assert str(image.url).startswith(f"{serve_cluster.url}/images/oa-cluster-1/")
        fetched = httpx.get(str(image.url), timeout=30)
        assert picture(fetched.content).size == (64, 128)
    assert len(list(Path(serve_cluster.storage_dir, "oa-cluster-1").iterdir())) == 2

    inline_answer = client.images.generate(
        prompt="a red cat", response_format="b64_json", output_format="webp"
    )
    assert inline_answer.data is not None
    decoded = picture(base64.b64decode(str(inline_answer.data[0].b64_json)))
    assert (decoded.format, decoded.size) == ("WEBP", (256, 256))  # config/serve.yaml's default

    with pytest.raises(openai.BadRequestError) as raised:
        client.images.generate(prompt="a red cat", size="1000x1000")
    assert raised.value.param == "size"
    assert "multiple of 16" in raised.value.message


@pytest.mark.ray
def test_an_edit_against_the_cluster(serve_cluster: ServeCluster) -> None:
    source = encode(gradient(96, 64))
    answer = sdk(serve_cluster.url).images.edit(
        image=png("cat.png", source),
        mask=png("mask.png", openai_mask((96, 64), 48)),
        prompt="a red cat",
        response_format="b64_json",
    )
    assert answer.data is not None
    made = pixels(base64.b64decode(str(answer.data[0].b64_json)))
    assert made.shape == (64, 96, 3)
    assert np.array_equal(made[:, 48:], pixels(source)[:, 48:])
