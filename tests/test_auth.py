"""Optional API keys: Bearer tokens on /generate, /healthz stays open."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from serve_app.api.routes import create_app
from serve_app.settings import ServiceSettings
from serve_app.storage.local import LocalImageStore

from .conftest import MakeService
from .live_server import always_ready

KEYS = ["first-key", "second-key"]
REQUEST = {"prompt": "a red cat", "nof_images": 1, "width": 64, "height": 64}


@pytest.fixture
def locked_client(
    settings: ServiceSettings, make_service: MakeService, store: LocalImageStore
) -> Iterator[TestClient]:
    keyed = settings.model_copy(update={"api_keys": [SecretStr(k) for k in KEYS]})
    locked = make_service(keyed, store)

    with TestClient(create_app(locked, always_ready)) as client:
        yield client


@pytest.mark.parametrize("key", KEYS)
def test_a_valid_key_is_admitted(locked_client: TestClient, key: str) -> None:
    response = locked_client.post(
        "/generate", json=REQUEST, headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-header"),
        pytest.param({"Authorization": "Bearer wrong"}, id="wrong-key"),
        pytest.param({"Authorization": "Bearer first-ke"}, id="prefix-of-a-key"),
        pytest.param({"Authorization": "Basic first-key"}, id="wrong-scheme"),
        pytest.param({"Authorization": "Bearer "}, id="empty-key"),
    ],
)
def test_without_a_valid_key_401_with_www_authenticate(
    locked_client: TestClient, headers: dict[str, str]
) -> None:
    response = locked_client.post("/generate", json=REQUEST, headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.json()["error"]["type"] == "authentication_error"
    assert "first-key" not in response.text


def test_healthz_stays_open(locked_client: TestClient) -> None:
    assert locked_client.get("/healthz").status_code == 200


def test_keys_come_from_a_comma_separated_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUX_SERVE_API_KEYS", " first-key, second-key ,")
    keys = ServiceSettings().api_keys
    assert [key.get_secret_value() for key in keys] == KEYS
    assert "first-key" not in repr(ServiceSettings())


def test_no_keys_means_no_authentication(client: TestClient) -> None:
    assert client.post("/generate", json=REQUEST).status_code == 200
