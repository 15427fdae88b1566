"""The REST API over in-process models: the same app the ingress serves, without a cluster."""

from __future__ import annotations

import io
import re
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serve_app.storage.local import LocalImageStore

from .images import mean_abs_difference
from .sse import parse_events


def docs_pages_load_from_the_service(client: httpx.Client) -> None:
    """/docs and /redoc, and every file they load, come from the service itself."""
    for page in ("/docs", "/redoc"):
        html = client.get(page)
        assert html.status_code == 200
        assets = re.findall(r'(?:src|href)="([^"]+)"', html.text)
        assert len(assets) >= 2, page  # the bundle and the icon at least
        for asset in assets:
            assert asset.startswith("/"), f"{page} loads {asset} from elsewhere"
            assert client.get(asset).status_code == 200, asset


def generate(client: TestClient, **payload: object) -> dict:  # type: ignore[type-arg]
    response = client.post("/generate", json={"prompt": "a red cat", **payload})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_a_prompt_alone_gives_16_images_that_open(client: TestClient) -> None:
    body = generate(client)
    assert body["count"] == 16 == len(body["images"])
    assert body["prompt"] == "a red cat"
    assert isinstance(body["latency_ms"], int)
    assert [image["index"] for image in body["images"]] == list(range(16))
    for image in body["images"]:
        assert image["sampling_params"]["sampler"] == "euler"
        assert image["sampling_params"]["steps"] == 4
        fetched = client.get(image["url"])
        assert fetched.status_code == 200
        assert fetched.headers["content-type"] == "image/png"
        assert fetched.content.startswith(b"\x89PNG")
    assert len({image["url"] for image in body["images"]}) == 16


def test_an_images_parameters_reproduce_it_through_the_api(client: TestClient) -> None:
    first = generate(
        client, nof_images=2, diversity={"samplers": ["heun", "unipc"], "nof_steps": [2, 3]}
    )
    for image in first["images"]:
        params = image["sampling_params"]
        again = generate(
            client,
            nof_images=1,
            base_seed=params["seed"],
            width=params["width"],
            height=params["height"],
            diversity={
                "samplers": [params["sampler"]],
                "nof_steps": [params["steps"]],
                "cfg_scales": [params["cfg_scale"]],
                "seeds": "fixed",
            },
        )["images"][0]
        assert again["sampling_params"] == params
        original = client.get(image["url"]).content
        assert mean_abs_difference(original, client.get(again["url"]).content) == 0


def test_a_request_picks_the_encoding_of_its_images(client: TestClient) -> None:
    made = {
        quality: generate(
            client, nof_images=1, base_seed=3, image_format="jpeg", image_quality=quality
        )["images"][0]
        for quality in (5, 95)
    }
    fetched = {quality: client.get(image["url"]) for quality, image in made.items()}
    for quality, response in fetched.items():
        assert made[quality]["url"].endswith(".jpeg")
        assert response.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(response.content)).format == "JPEG"
    assert len(fetched[5].content) < len(fetched[95].content)
    webp = generate(client, nof_images=1, image_format="webp")["images"][0]
    assert client.get(webp["url"]).headers["content-type"] == "image/webp"


def test_top_k_returns_the_best_k_sorted_and_stores_only_them(
    client: TestClient, store: LocalImageStore
) -> None:
    everything = generate(client, nof_images=6, base_seed=5)
    best = generate(client, nof_images=6, base_seed=5, top_k=2)
    expected = sorted(everything["images"], key=lambda image: -image["score"])[:2]
    assert [i["index"] for i in best["images"]] == [i["index"] for i in expected]
    assert best["count"] == 2
    stored = [p for p in Path(store.root, best["request_id"]).iterdir()]
    assert len(stored) == 2


def test_streaming_sends_each_image_then_the_result(client: TestClient) -> None:
    with client.stream(
        "POST", "/generate", json={"prompt": "a red cat", "nof_images": 5, "stream": True}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = parse_events(response.iter_lines())
    names = [name for name, _ in events]
    assert names == ["image"] * 5 + ["result"]
    result = events[-1][1]
    assert result["count"] == 5
    assert sorted(data["url"] for _, data in events[:-1]) == sorted(
        i["url"] for i in result["images"]
    )


def test_streaming_with_top_k_sends_the_k_best(client: TestClient) -> None:
    payload = {"prompt": "a red cat", "nof_images": 4, "top_k": 2, "stream": True}
    with client.stream("POST", "/generate", json=payload) as response:
        events = parse_events(response.iter_lines())
    assert [name for name, _ in events] == ["image", "image", "result"]
    scores = [data["score"] for _, data in events[:2]]
    assert scores == sorted(scores, reverse=True)


def test_bad_input_gets_422_with_the_envelope(client: TestClient) -> None:
    response = client.post(
        "/generate", json={"prompt": "a red cat", "diversity": {"samplers": ["euler", "ddim"]}}
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "invalid_request"
    assert error["param"] == "diversity.samplers.1"
    assert "ddim" in error["message"]
    assert "dpmpp_2m" in error["message"]


JSON = {"content-type": "application/json"}


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        pytest.param(
            b"not json",
            JSON,
            "the body is not valid JSON: Expecting value at line 1 column 1",
            id="not-json",
        ),
        pytest.param(
            b'{"prompt": "a red cat",\n "nof_images": 2,}',
            JSON,
            "the body is not valid JSON: Expecting property name enclosed in double quotes "
            "at line 2 column 18",
            id="trailing-comma-on-line-2",
        ),
        pytest.param(
            b'{"prompt": "a red cat"}',
            {},
            "send the body as JSON with content-type: application/json",
            id="json-without-content-type",
        ),
        pytest.param(
            b'{"prompt": "a red cat"}',
            {"content-type": "application/x-www-form-urlencoded"},
            "send the body as JSON with content-type: application/json",
            id="json-as-curl-sends-it-without-a-header",
        ),
        pytest.param(b"", JSON, "the body is empty; send a JSON object", id="empty"),
        pytest.param(b'["a red cat"]', JSON, "the body must be a JSON object", id="array"),
    ],
)
def test_a_body_that_is_not_a_json_object_says_what_to_send(
    client: TestClient, body: bytes, headers: dict[str, str], message: str
) -> None:
    response = client.post("/generate", content=body, headers=headers)
    assert response.status_code == 422
    assert response.json() == {
        "error": {"type": "invalid_request", "message": message, "param": None}
    }


def test_request_id_is_echoed_and_names_the_images(client: TestClient) -> None:
    response = client.post(
        "/generate", json={"prompt": "x", "nof_images": 1}, headers={"X-Request-Id": "abc-123"}
    )
    assert response.headers["X-Request-Id"] == "abc-123"
    assert "/images/abc-123/" in response.json()["images"][0]["url"]


def test_unknown_images_are_404_and_keys_cannot_escape_the_store(client: TestClient) -> None:
    assert client.get("/images/nope/0000.png").status_code == 404
    assert client.get("/images/..%2F..%2Fetc/passwd.png").status_code == 404


def test_healthz_and_docs(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"ready": True, "detail": "ok"}
    schema = client.get("/openapi.json").json()
    request_schema = schema["components"]["schemas"]["GenerateRequest"]
    assert "prompt" in request_schema["required"]
    assert request_schema["additionalProperties"] is False
    for name, field in request_schema["properties"].items():
        assert field.get("description"), name
    docs_pages_load_from_the_service(client)


def test_every_response_carries_a_request_id(client: TestClient) -> None:
    refused = client.post("/generate", json={"prompt": ""}, headers={"X-Request-Id": "req-7"})
    assert refused.status_code == 422
    assert refused.headers["X-Request-Id"] == "req-7"
    fresh = client.get("/healthz").headers["X-Request-Id"]
    assert len(fresh) == 32
    unsafe = client.get("/healthz", headers={"X-Request-Id": "../../etc"}).headers["X-Request-Id"]
    assert unsafe != "../../etc"
