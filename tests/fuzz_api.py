"""Fuzzing of the REST API from its own OpenAPI schema. test_fuzz_api.py runs this file in a
process of its own, with small request limits so that every valid case generates quickly."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from serve_app.api.routes import create_app
from serve_app.settings import ServiceSettings
from serve_app.storage.local import LocalImageStore

from .conftest import MakeService
from .live_server import always_ready

CASES_PER_MODE = int(os.environ.get("FUZZ_CASES_PER_MODE", "250"))
# What JSON Schema can't say (top_k at most nof_images; a mask or a strength only with an image,
# and whether a string or a file is an image at all; a size's bounds and multiple of 16), and which
# adapters a library holds (their names and digests are data, not schema): data valid by the
# schema may break these, and then only these. The refusals each path answers then.
SCHEMA_BLIND = {
    "/generate": (422, re.compile(r"^(top_k|image|mask|strength|loras\.\d+\.(name|digest))$")),
    "/v1/images/generations": (400, re.compile(r"^size$")),
    # Also whether the files are images (and one of them), a mask's alpha and size.
    "/v1/images/edits": (400, re.compile(r"^(size|image|mask)$")),
}


@pytest.fixture(scope="module")
def schema(
    settings: ServiceSettings, make_service: MakeService, tmp_path_factory: pytest.TempPathFactory
) -> schemathesis.BaseSchema:
    store = LocalImageStore(tmp_path_factory.mktemp("fuzz-images"), public_base_url=None)
    app = create_app(make_service(settings, store), always_ready)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module")
def case_counter() -> Iterator[list[int]]:
    count = [0]
    yield count
    Path(os.environ["FUZZ_COUNT_FILE"]).write_text(str(count[0]))


@pytest.mark.parametrize(
    ("path", "method", "mode"),
    [
        ("/generate", "POST", GenerationMode.POSITIVE),
        ("/generate", "POST", GenerationMode.NEGATIVE),
        ("/v1/images/generations", "POST", GenerationMode.POSITIVE),
        ("/v1/images/generations", "POST", GenerationMode.NEGATIVE),
        ("/v1/images/edits", "POST", GenerationMode.POSITIVE),
        ("/v1/images/edits", "POST", GenerationMode.NEGATIVE),
        # /healthz and /loras take no input that could be invalid.
        ("/healthz", "GET", GenerationMode.POSITIVE),
        ("/loras", "GET", GenerationMode.POSITIVE),
    ],
)
def test_no_server_error_and_every_answer_matches_the_schema(
    schema: schemathesis.BaseSchema,
    case_counter: list[int],
    path: str,
    method: str,
    mode: GenerationMode,
) -> None:
    operation = schema[path][method]

    @settings(
        max_examples={"/generate": CASES_PER_MODE, "/healthz": 10, "/loras": 10}.get(
            path, CASES_PER_MODE // 5
        ),
        deadline=None,
        database=None,
        # The same cases on every run: CI stays reproducible (FUZZ_CASES_PER_MODE widens them).
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        case = data.draw(operation.as_strategy(mode))
        case_counter[0] += 1
        # Every other check runs.
        response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
        assert response.status_code < 500, response.text
        status, params = SCHEMA_BLIND.get(path, (None, None))
        if mode == GenerationMode.POSITIVE and response.status_code == status:
            assert params is not None
            assert params.match(response.json()["error"]["param"]), response.text

    run()
