"""The Python client and the flux-serve command against the application over real HTTP."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from pydantic import SecretStr

from serve_app.api.routes import create_app
from serve_app.client import (
    AsyncFluxClient,
    FluxAPIError,
    FluxClient,
    FluxConnectionError,
    FluxTimeoutError,
)
from serve_app.client.cli import ExitCode
from serve_app.client.cli import main as cli_main
from serve_app.client.events import ServerSentEvent, read_events
from serve_app.generation.pipeline import RenderedImage
from serve_app.generation.planning import SamplingJob
from serve_app.generation.scheduling import RenderScheduler
from serve_app.inputs.pixels import RenderInputs
from serve_app.models.scoring import ClipScorer
from serve_app.schemas import Diversity, GenerateRequest, Readiness
from serve_app.service import GenerationService, RenderStream
from serve_app.settings import ServiceSettings
from serve_app.storage.local import LocalImageStore

from .conftest import MakeService
from .images import mean_abs_difference, pixels
from .live_server import always_ready, refusing_address, serve_over_http, silent_address

PROMPT = "a red cat"
KEY = "test-key"
# Valid for each field alone, refused by the service as a whole: built without local validation.
TOO_MANY_KEPT = GenerateRequest.model_construct(prompt=PROMPT, nof_images=2, top_k=3)
FILE_NAME = re.compile(
    r"(?P<index>\d{2})_(?P<sampler>\w+?)_(?P<steps>\d+)steps_cfg(?P<cfg>[\d.]+)"
    r"_seed(?P<seed>\d+)\.(?:png|jpeg|webp)"
)

ServiceRendering = Callable[[RenderStream], GenerationService]


@pytest.fixture(autouse=True)
def _no_service_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The command's defaults come from these; the caller's shell must not leak into the tests.
    monkeypatch.delenv("FLUX_SERVE_URL", raising=False)
    monkeypatch.delenv("FLUX_SERVE_API_KEY", raising=False)


@pytest.fixture
def service_rendering(
    settings: ServiceSettings, scorer: ClipScorer, store: LocalImageStore
) -> ServiceRendering:
    """The request flow with a render step of the test's own."""

    async def score(prompt: str, images: list[bytes]) -> list[float]:
        return scorer.score(prompt, images)

    return lambda render: GenerationService(settings, render, score, store)


@pytest.fixture
def keyed_url(
    settings: ServiceSettings, make_service: MakeService, store: LocalImageStore
) -> Iterator[str]:
    """The application with API keys on."""
    keyed = settings.model_copy(update={"api_keys": [SecretStr(KEY)]})
    with serve_over_http(create_app(make_service(keyed, store), always_ready)) as url:
        yield url


@pytest.fixture
def failing_url(scheduler: RenderScheduler, service_rendering: ServiceRendering) -> Iterator[str]:
    """The application on a worker that crashes after its first image."""

    async def crash(
        jobs: list[SamplingJob], inputs: RenderInputs
    ) -> AsyncIterator[list[RenderedImage]]:
        async for batch in scheduler.render(jobs[:1], inputs):
            yield batch
        raise RuntimeError("the GPU fell off")

    with serve_over_http(create_app(service_rendering(crash), always_ready)) as url:
        yield url


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of one ``flux-serve`` command."""
    try:
        code = cli_main(list(argv))
    except SystemExit as exit_:  # argparse's usage errors
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


# The client


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        pytest.param(
            ["event: image", 'data: {"a": 1}', "", "event: result", "data: {}", ""],
            [ServerSentEvent("image", '{"a": 1}'), ServerSentEvent("result", "{}")],
            id="two-events",
        ),
        pytest.param(
            [": keep-alive", "event:error", "data: first", "data:second", ""],
            [ServerSentEvent("error", "first\nsecond")],
            id="comment-multiline-data-no-space",
        ),
        pytest.param(
            ["data: plain", "", "event: lonely", "", "event: cut", "data: off"],
            [ServerSentEvent("message", "plain")],
            id="default-name-no-data-unterminated",
        ),
    ],
)
def test_event_stream_parsing(lines: list[str], expected: list[ServerSentEvent]) -> None:
    assert list(read_events(lines)) == expected


def test_generate_returns_every_image_with_its_parameters(live_url: str) -> None:
    request = GenerateRequest(
        prompt=PROMPT, nof_images=4, diversity=Diversity(samplers=["euler", "heun"]), width=64
    )
    with FluxClient(live_url) as client:
        response = client.generate(request)
        assert response.count == 4 == len(response.images)
        assert response.prompt == PROMPT
        assert [image.index for image in response.images] == [0, 1, 2, 3]
        assert {image.sampling_params.sampler for image in response.images} == {"euler", "heun"}
        for image in response.images:
            assert image.sampling_params.width == 64
            assert pixels(client.download(image)).shape[:2] == (128, 64)


def test_stream_yields_each_image_before_the_next_is_made(
    scheduler: RenderScheduler, service_rendering: ServiceRendering
) -> None:
    received = [threading.Event() for _ in range(3)]

    async def one_after_another(
        jobs: list[SamplingJob], inputs: RenderInputs
    ) -> AsyncIterator[list[RenderedImage]]:
        # Each image is made only once the client holds the one before: a client or server that
        # buffered the stream would never see the second.
        for position, job in enumerate(jobs):
            if position and not await asyncio.to_thread(received[position - 1].wait, 30):
                raise RuntimeError(f"image {position - 1} never reached the client")
            async for batch in scheduler.render([job], inputs):
                yield batch

    app = create_app(service_rendering(one_after_another), always_ready)
    try:
        with serve_over_http(app) as url, FluxClient(url) as client:
            stream = client.stream(GenerateRequest(prompt=PROMPT, nof_images=3))
            streamed = []
            for position, image in enumerate(stream):
                assert stream.result is None
                assert image.index == position
                streamed.append(image)
                received[position].set()
            assert list(stream) == []
    finally:
        for event in received:
            event.set()
    assert stream.result is not None
    assert stream.result.count == 3
    assert stream.result.images == streamed


def test_health_reports_readiness(service: GenerationService) -> None:
    async def starting() -> Readiness:
        return Readiness(ready=False, detail="FluxWorker: UPDATING")

    for readiness, expected in [(always_ready, True), (starting, False)]:
        with serve_over_http(create_app(service, readiness)) as url, FluxClient(url) as client:
            health = client.health()
        assert health.ready is expected


@pytest.mark.parametrize(
    "send",
    [
        pytest.param(lambda client: client.generate(TOO_MANY_KEPT), id="generate"),
        pytest.param(lambda client: list(client.stream(TOO_MANY_KEPT)), id="stream"),
    ],
)
def test_a_refused_request_raises_the_envelope_with_its_param(
    live_url: str, send: Callable[[FluxClient], object]
) -> None:
    with FluxClient(live_url) as client, pytest.raises(FluxAPIError) as refused:
        send(client)
    error = refused.value
    assert (error.status, error.type, error.param) == (422, "invalid_request", "top_k")
    assert "top_k (3) must not exceed nof_images (2)" in error.message
    assert error.is_client_error


def test_a_server_failure_raises_the_envelope(failing_url: str) -> None:
    request = GenerateRequest(prompt=PROMPT, nof_images=2, diversity=Diversity(nof_steps=[1, 2]))
    received = []
    # A client each: after an unhandled error uvicorn closes the connection it answered on.
    with FluxClient(failing_url) as client, pytest.raises(FluxAPIError) as whole:
        client.generate(request)
    with FluxClient(failing_url) as client, pytest.raises(FluxAPIError) as streamed:  # noqa: PT012
        for image in client.stream(request):  # the first image comes before the failure
            received.append(image)
    assert (whole.value.status, whole.value.type) == (500, "internal_error")
    # The stream had begun (status 200) when the failure came: it arrives as an error event.
    assert len(received) == 1
    assert (streamed.value.status, streamed.value.type) == (None, "internal_error")
    assert not whole.value.is_client_error


def test_the_async_client_does_what_the_sync_one_does(live_url: str) -> None:
    async def scenario() -> None:
        async with AsyncFluxClient(live_url) as client:
            assert (await client.health()).ready
            whole = await client.generate(GenerateRequest(prompt=PROMPT, nof_images=2))
            assert whole.count == 2
            stream = client.stream(GenerateRequest(prompt=PROMPT, nof_images=3, top_k=2))
            streamed = [image async for image in stream]
            assert stream.result is not None
            assert stream.result.images == streamed
            assert len(streamed) == 2
            assert pixels(await client.download(streamed[0])).size > 0
            with pytest.raises(FluxAPIError) as refused:
                await client.generate(TOO_MANY_KEPT)
            assert (refused.value.status, refused.value.param) == (422, "top_k")

    asyncio.run(scenario())


def test_the_api_key_is_sent_as_bearer_and_only_to_the_service(keyed_url: str) -> None:
    request = GenerateRequest(prompt=PROMPT, nof_images=1)
    with FluxClient(keyed_url) as anonymous, pytest.raises(FluxAPIError) as refused:
        anonymous.generate(request)
    assert (refused.value.status, refused.value.type) == (401, "authentication_error")
    with FluxClient(keyed_url, api_key=KEY) as client:
        assert client.generate(request).count == 1
        assert client.health().ready

    echo = FastAPI()

    @echo.get("/authorization")
    async def authorization(incoming: Request) -> str | None:
        return incoming.headers.get("authorization")

    with serve_over_http(echo) as other:
        with FluxClient(other, api_key=KEY) as client:
            assert client.download(f"{other}/authorization") == f'"Bearer {KEY}"'.encode()
        with FluxClient(keyed_url, api_key=KEY) as client:
            assert client.download(f"{other}/authorization") == b"null"


def test_an_unreachable_service_raises_a_connection_error() -> None:
    with refusing_address() as url, FluxClient(url) as client:
        with pytest.raises(FluxConnectionError, match="Connection refused"):
            client.health()
        with pytest.raises(FluxConnectionError):
            list(client.stream(GenerateRequest(prompt=PROMPT)))


def test_a_service_that_never_answers_raises_a_timeout() -> None:
    with silent_address() as url, FluxClient(url, timeout=0.5) as client:
        with pytest.raises(FluxTimeoutError):
            client.generate(GenerateRequest(prompt=PROMPT))
        with pytest.raises(FluxTimeoutError):
            client.health()


# The command


def table_rows(out: str) -> list[list[str]]:
    """The body rows of the table the command prints, as cells."""
    return [
        [cell.strip() for cell in line.strip().strip("│").split("│")]
        for line in out.splitlines()
        if line.startswith("│")
    ]


def test_cli_generate_saves_images_named_by_their_parameters_and_prints_a_table(
    live_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "out"
    code, out, err = run_cli(
        capsys,
        *("generate", PROMPT, "-n", "4", "--samplers", "euler,heun", "--steps", "1,2"),
        *("--seeds", "fixed", "--base-seed", "7", "--out", str(folder), "--url", live_url),
    )
    assert code == ExitCode.OK, err
    assert "4 images in" in err
    names = {path.name: FILE_NAME.fullmatch(path.name) for path in folder.iterdir()}
    assert all(names.values()), sorted(names)
    described = {(m["sampler"], m["steps"], m["cfg"], m["seed"]) for m in names.values() if m}
    assert described == {(s, n, "1.0", "7") for s in ("euler", "heun") for n in ("1", "2")}

    header = next(line for line in out.splitlines() if "sampler" in line)
    for column in ("#", "score", "sampler", "steps", "cfg", "seed", "url", "file"):
        assert f" {column} " in header
    rows = table_rows(out)
    assert [row[0] for row in rows] == ["0", "1", "2", "3"]
    with FluxClient(live_url) as client:
        for index, score, sampler, steps, cfg, seed, url, file in rows:
            float(score)
            saved = Path(file)
            assert saved.parent == folder
            named = FILE_NAME.fullmatch(saved.name)
            assert named is not None
            assert named.groups() == (f"{int(index):02d}", sampler, steps, cfg, seed)
            assert saved.read_bytes() == client.download(url)
            # The name tells the truth: its parameters make the same pixels again.
            again = client.generate(
                GenerateRequest(
                    prompt=PROMPT,
                    nof_images=1,
                    base_seed=int(seed),
                    diversity=Diversity(
                        samplers=[sampler],
                        nof_steps=[int(steps)],
                        cfg_scales=[float(cfg)],
                        seeds="fixed",
                    ),
                )
            )
            assert mean_abs_difference(saved.read_bytes(), client.download(again.images[0])) == 0


def test_cli_generate_without_a_folder_prints_the_best_first(
    live_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(
        capsys, "generate", PROMPT, "-n", "4", "--top-k", "2", "--url", live_url
    )
    assert code == ExitCode.OK, err
    rows = table_rows(out)
    assert len(rows) == 2
    scores = [float(row[1]) for row in rows]
    assert scores == sorted(scores, reverse=True)
    assert all(row[6].startswith(f"{live_url}/images/") for row in rows)


@pytest.mark.parametrize(
    ("arguments", "message", "param"),
    [
        pytest.param(
            ["-n", "2", "--top-k", "3"],
            "top_k (3) must not exceed nof_images (2)",
            "top_k",
            id="top-k-above-images",
        ),
        pytest.param(
            ["--samplers", "euler,ddim"],
            "unsupported sampler 'ddim'",
            "diversity.samplers.1",
            id="unknown-sampler",
        ),
    ],
)
def test_cli_shows_why_the_service_refused(
    live_url: str,
    capsys: pytest.CaptureFixture[str],
    arguments: list[str],
    message: str,
    param: str,
) -> None:
    code, out, err = run_cli(capsys, "generate", PROMPT, *arguments, "--url", live_url)
    assert code == ExitCode.REFUSED
    assert "refused the request (HTTP 422, invalid_request)" in err
    assert message in err
    assert f"param: {param}" in err
    assert out == ""


@pytest.mark.parametrize(
    "arguments",
    [
        pytest.param(["generate"], id="no-prompt"),
        pytest.param(["generate", PROMPT, "--steps", "2,x"], id="steps-not-numbers"),
        pytest.param(["health", "--url", "localhost:8000"], id="url-without-scheme"),
        pytest.param(["generate", PROMPT, "--lora", "tiny-mlp:strong"], id="lora-scale"),
    ],
)
def test_cli_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], arguments: list[str]) -> None:
    code, _, err = run_cli(capsys, *arguments)
    assert code == ExitCode.REFUSED
    assert "usage: flux-serve" in err


def test_cli_lists_the_adapters_and_applies_them(
    live_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, "loras", "--url", live_url)
    assert code == ExitCode.OK, err
    with FluxClient(live_url) as client:
        listing = client.loras()
    for info in listing.loras:
        assert info.name in out
        assert info.digest in out
    assert f"{len(listing.loras)} adapters; at most 3 per request" in err

    code, out, err = run_cli(
        capsys,
        *("generate", PROMPT, "-n", "2", "--lora", "tiny-attention:0.5", "--lora", "tiny-mlp"),
        *("--url", live_url),
    )
    assert code == ExitCode.OK, err
    rows = table_rows(out)
    assert [row[-1] for row in rows] == ["tiny-attention:0.5, tiny-mlp:1"] * 2

    code, out, err = run_cli(capsys, "generate", PROMPT, "--lora", "nobody", "--url", live_url)
    assert code == ExitCode.REFUSED
    assert "no adapter 'nobody'" in err
    assert "param: loras.0.name" in err


def test_cli_needs_the_api_key_and_takes_it_and_the_url_from_the_environment(
    keyed_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = run_cli(capsys, "generate", PROMPT, "-n", "1", "--url", keyed_url)
    assert code == ExitCode.REFUSED
    assert "(HTTP 401, authentication_error)" in err
    assert "--api-key or FLUX_SERVE_API_KEY" in err

    monkeypatch.setenv("FLUX_SERVE_URL", keyed_url)
    monkeypatch.setenv("FLUX_SERVE_API_KEY", KEY)
    code, out, err = run_cli(capsys, "generate", PROMPT, "-n", "1")
    assert code == ExitCode.OK, err
    assert len(table_rows(out)) == 1


def test_cli_health(
    live_url: str, service: GenerationService, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "health", "--url", live_url)
    assert (code, out.strip()) == (ExitCode.OK, "ready: ok")

    async def starting() -> Readiness:
        return Readiness(ready=False, detail="FluxWorker: UPDATING")

    with serve_over_http(create_app(service, starting)) as url:
        code, _, err = run_cli(capsys, "health", "--url", url)
    assert code == ExitCode.UNAVAILABLE
    assert "not ready: FluxWorker: UPDATING" in err


@pytest.mark.parametrize(
    "command",
    [pytest.param(["health"], id="health"), pytest.param(["generate", PROMPT], id="generate")],
)
def test_cli_says_when_the_service_is_down(
    capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    with refusing_address() as url:
        code, _, err = run_cli(capsys, *command, "--url", url)
    assert code == ExitCode.UNAVAILABLE
    assert f"cannot reach {url}" in err
    assert "Is the service running?" in err


def test_cli_says_when_the_service_times_out(capsys: pytest.CaptureFixture[str]) -> None:
    with silent_address() as url:
        code, _, err = run_cli(capsys, "generate", PROMPT, "--url", url, "--timeout", "0.5")
    assert code == ExitCode.TIMEOUT
    assert f"the service at {url} did not answer within 0.5 s" in err


def test_cli_reports_a_failure_during_the_stream(
    failing_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(
        capsys, "generate", PROMPT, "-n", "2", "--steps", "1,2", "--url", failing_url
    )
    assert code == ExitCode.SERVER_ERROR
    assert "the service failed (during the stream, internal_error)" in err


def test_exit_codes_are_documented(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ([], ["generate"], ["health"]):
        code, out, _ = run_cli(capsys, *command, "--help")
        assert code == ExitCode.OK
        for exit_code in ExitCode:
            assert re.search(rf"^  {exit_code.value}  \S", out, re.MULTILINE), (command, exit_code)
