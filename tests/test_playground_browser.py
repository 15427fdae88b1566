"""The web playground at / in a real headless Chromium (Debian's), driven by Playwright."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Route, expect, sync_playwright
from pydantic import SecretStr

from serve_app.api.routes import create_app
from serve_app.generation.samplers import supported_samplers
from serve_app.models.tiny_loras import TINY_LORAS
from serve_app.settings import ServiceSettings
from serve_app.storage.local import LocalImageStore

from .conftest import ROOT, MakeService
from .images import encode, gradient
from .live_server import always_ready, serve_over_http

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ARTIFACTS = ROOT / "test-artifacts"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
KEY = "browser-key"
ALL_LOADED = """count => {
    const images = [...document.querySelectorAll("#grid img")];
    return images.length === count && images.every(i => i.complete && i.naturalWidth > 0);
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing; scripts/system-deps.sh installs it (root, apt-get)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@dataclass
class PageLog:
    """What a page reported as errors in its console, and what it tried to fetch off this
    machine (blocked, as on a cluster without internet)."""

    errors: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    tolerated: set[str] = field(default_factory=set)

    def tolerate(self, url: str) -> None:
        """Let the page fail to fetch ``url`` (still blocked) without failing the test."""
        self.tolerated.add(url)

    def console(self, message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        url = message.location["url"]
        # A refused request is an answer the page shows (the tests check that), not a fault.
        refused = url.endswith(("/generate", "/loras")) and message.text.startswith(
            "Failed to load resource: the server responded with a status of 4"
        )
        if not refused and url not in self.tolerated:
            self.errors.append(f"{message.text} ({url})")

    def route(self, route: Route) -> None:
        url = route.request.url
        if urlsplit(url).hostname in LOOPBACK:
            route.continue_()
            return
        if url not in self.tolerated:
            self.blocked.append(url)
        route.abort("internetdisconnected")


@pytest.fixture
def page_log() -> PageLog:
    return PageLog()


@pytest.fixture
def page(browser: Browser, page_log: PageLog) -> Iterator[Page]:
    """A page with no network beyond this machine; the test fails if the page logged an error
    or tried to fetch anything from elsewhere."""
    context = browser.new_context(viewport={"width": 1180, "height": 760})
    context.route("**/*", page_log.route)
    opened = context.new_page()
    opened.on("console", page_log.console)
    opened.on("pageerror", lambda error: page_log.errors.append(f"uncaught: {error}"))
    opened.set_default_timeout(60_000)
    yield opened
    context.close()
    assert page_log.blocked == [], "the page fetched from off this machine"
    assert page_log.errors == [], "the page logged errors"


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)


def ask(page: Page, prompt: str, **fields: str) -> None:
    """Fill the form and submit it."""
    page.fill("#prompt", prompt)
    for name, value in fields.items():
        page.fill(f"#{name}", value)
    page.click("#submit")


def test_the_page_is_served_and_left_out_of_the_schema(live_url: str) -> None:
    page = httpx.get(f"{live_url}/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "__SUPPORTED_SAMPLERS__" not in page.text
    assert "/" not in httpx.get(f"{live_url}/openapi.json").json()["paths"]


def test_images_stream_into_the_grid_with_their_parameters(live_url: str, page: Page) -> None:
    page.goto(f"{live_url}/")
    checkboxes = page.locator("input[name=sampler]")
    assert checkboxes.evaluate_all("boxes => boxes.map(b => b.value)") == supported_samplers()
    page.check("input[name=sampler][value=euler]")
    page.check("input[name=sampler][value=dpmpp_2m]")
    ask(page, "a red cat on a blue sofa", nof_images="4", nof_steps="1,2")

    page.wait_for_function(ALL_LOADED, arg=4)
    expect(page.locator("#status")).to_contain_text("4 images in")
    screenshot(page, "playground")
    captions = page.locator("#grid figcaption").all_inner_texts()
    assert {"euler", "dpmpp_2m"} == {
        sampler for caption in captions for sampler in ("euler", "dpmpp_2m") if sampler in caption
    }
    assert all("score" in caption and "seed" in caption for caption in captions)
    links = page.locator("#grid a")
    for index in range(links.count()):
        link = links.nth(index)
        assert link.get_attribute("target") == "_blank"
        assert link.get_attribute("href") == link.locator("img").get_attribute("src")
    expect(page.locator("#error")).to_be_hidden()


def test_a_refused_request_shows_the_servers_message(live_url: str, page: Page) -> None:
    page.goto(f"{live_url}/")
    ask(page, "a red cat", nof_images="2", top_k="3")

    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("top_k (3) must not exceed nof_images (2)")
    expect(error).to_contain_text("param: top_k")
    screenshot(page, "playground-refused")
    assert page.locator("#grid img").count() == 0


def test_the_api_key_is_sent_and_kept(
    settings: ServiceSettings, make_service: MakeService, store: LocalImageStore, page: Page
) -> None:
    keyed = settings.model_copy(update={"api_keys": [SecretStr(KEY)]})
    with serve_over_http(create_app(make_service(keyed, store), always_ready)) as url:
        page.goto(f"{url}/")
        expect(page.locator("#loras")).to_contain_text("Enter the API key to list them")
        ask(page, "a red cat", nof_images="1")
        expect(page.locator("#error")).to_contain_text("a valid API key is required")

        page.fill("#api_key", KEY)
        page.dispatch_event("#api_key", "change")
        expect(page.locator("input[name=lora]")).to_have_count(len(TINY_LORAS))
        page.click("#submit")
        page.wait_for_function(ALL_LOADED, arg=1)
        expect(page.locator("#error")).to_be_hidden()

        page.reload()
        expect(page.locator("#api_key")).to_have_value(KEY)


def test_the_api_docs_render_their_operations_offline(
    live_url: str, page: Page, page_log: PageLog
) -> None:
    page.goto(f"{live_url}/docs")
    operations = page.locator(".opblock-summary")
    expect(operations.filter(has_text="/generate")).to_be_visible()
    expect(operations.filter(has_text="/healthz")).to_be_visible()
    screenshot(page, "docs")

    # ReDoc's "API docs by Redocly" logo is its one request off the machine; without it ReDoc
    # shows the link without the logo.
    page_log.tolerate(REDOC_LOGO)
    page.goto(f"{live_url}/redoc")
    expect(page.locator("h1", has_text="flux-serve")).to_be_visible()
    expect(page.get_by_text("Generate, rank and store images for a prompt.")).to_be_visible()
    screenshot(page, "redoc")


def test_the_playground_has_an_icon_that_needs_no_request(live_url: str, page: Page) -> None:
    # Without a declared icon the browser asks for /favicon.ico, a 404 in the console.
    page.goto(f"{live_url}/")
    icon = page.locator("link[rel=icon]").get_attribute("href")
    assert icon is not None
    assert icon.startswith("data:image/svg+xml,")
    drawn = page.evaluate(
        """href => new Promise(resolve => {
            const image = new Image();
            image.onload = () => resolve(image.naturalWidth > 0);
            image.onerror = () => resolve(false);
            image.src = href;
        })""",
        icon,
    )
    assert drawn is True


def test_an_image_dropped_on_the_page_is_repainted_at_the_chosen_strength(
    live_url: str, page: Page
) -> None:
    page.goto(f"{live_url}/")
    picture = base64.b64encode(encode(gradient(100, 70))).decode()
    # A real drop: a DataTransfer holding a PNG file, dispatched on the drop zone.
    page.locator("#image-drop").evaluate(
        """(zone, data) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "picture.png", { type: "image/png" }));
            zone.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true }));
        }""",
        picture,
    )
    expect(page.locator("#image-preview")).to_be_visible()
    page.locator("#strength").evaluate(
        "(slider) => { slider.value = '0.5'; slider.dispatchEvent(new Event('input')); }"
    )
    expect(page.locator("#strength-value")).to_have_text("0.5")
    ask(page, "a red cat", nof_images="2")

    page.wait_for_function(ALL_LOADED, arg=2)
    screenshot(page, "playground-image")
    captions = page.locator("#grid figcaption").all_inner_texts()
    assert all("strength 0.5" in caption for caption in captions), captions
    # Made at the input's size, rounded down to multiples of 16.
    sizes = page.locator("#grid img").evaluate_all(
        "images => images.map(i => [i.naturalWidth, i.naturalHeight])"
    )
    assert sizes == [[96, 64], [96, 64]]

    # A mask of another size, chosen with the file picker: the service's refusal is shown.
    page.set_input_files(
        "#mask",
        files=[{"name": "mask.png", "mimeType": "image/png", "buffer": encode(gradient(64, 64))}],
    )
    expect(page.locator("#mask-preview")).to_be_visible()
    page.click("#submit")
    expect(page.locator("#error")).to_contain_text("must be the same size")
    expect(page.locator("#error")).to_contain_text("param: mask")
