"""The web playground at / in a real headless Chromium (Debian's), driven by Playwright."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from pydantic import SecretStr

from serve_app.api.routes import create_app
from serve_app.generation.samplers import supported_samplers
from serve_app.models.tiny_loras import TINY_LORAS
from serve_app.settings import ServiceSettings
from serve_app.storage.local import LocalImageStore

from .conftest import ROOT, MakeService
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


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1180, "height": 760})
    opened = context.new_page()
    opened.set_default_timeout(60_000)
    yield opened
    context.close()


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


def test_adapters_are_picked_from_the_library_with_their_scales(live_url: str, page: Page) -> None:
    page.goto(f"{live_url}/")
    boxes = page.locator("input[name=lora]")
    expect(boxes).to_have_count(len(TINY_LORAS))
    assert boxes.evaluate_all("boxes => boxes.map(b => b.value)") == sorted(
        spec.name for spec in TINY_LORAS
    )
    page.check("input[name=lora][value=tiny-attention]")
    page.fill('input[name=lora_scale][data-lora="tiny-attention"]', "0.5")
    page.check("input[name=lora][value=tiny-mlp]")
    ask(page, "a red cat", nof_images="2")

    page.wait_for_function(ALL_LOADED, arg=2)
    screenshot(page, "playground-loras")
    captions = page.locator("#grid figcaption").all_inner_texts()
    assert len(captions) == 2
    assert all("tiny-attention 0.5 · tiny-mlp 1" in caption for caption in captions), captions
    expect(page.locator("#error")).to_be_hidden()
