"""Input images: data: URLs, formats, limits, fitting, and fetching from a real HTTPS host."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve_app.inputs.decoding import data_url_bytes, decode_image
from serve_app.inputs.errors import InputFetchFailed, InputRefused
from serve_app.inputs.fetching import fetch_image
from serve_app.inputs.fitting import fit_inputs, output_size
from serve_app.inputs.reading import read_uploaded
from serve_app.settings import ServiceSettings

from .https_server import ImageHost, answer, endless, https_image_host, stalled
from .images import data_url, encode, gradient

PICTURE = encode(gradient(96, 64))


@pytest.fixture
def limits(settings: ServiceSettings) -> ServiceSettings:
    """Small limits, so that refusals need only small files."""
    return settings.model_copy(
        update={"max_input_image_bytes": 64 * 1024, "max_input_image_pixels": 512 * 512}
    )


@pytest.mark.parametrize(
    ("image_format", "media_type"),
    [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")],
)
def test_each_supported_format_decodes_from_a_data_url(
    limits: ServiceSettings, image_format: str, media_type: str
) -> None:
    data = encode(gradient(96, 64), image_format)
    raw, declared = data_url_bytes(data_url(data, media_type), "image", limits)
    decoded = decode_image(raw, "image", limits, declared)
    assert decoded.image.size == (96, 64)
    assert decoded.digest == "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        pytest.param("data:image/png;base64", "no comma", id="no-comma"),
        pytest.param("data:image/png," + "x" * 10, "must be base64", id="not-base64"),
        pytest.param("data:image/gif;base64,R0lGOD", "format 'image/gif'", id="gif"),
        pytest.param("data:;base64,AAAA", "unsupported image format 'none'", id="no-type"),
        pytest.param("data:image/png;base64,***", "base64 is invalid", id="bad-base64"),
        pytest.param("data:image/png;base64," + "A" * 100_000, "over this service's", id="big"),
    ],
)
def test_a_malformed_data_url_is_refused(limits: ServiceSettings, url: str, reason: str) -> None:
    with pytest.raises(InputRefused, match=reason) as refused:
        data_url_bytes(url, "image", limits)
    assert refused.value.param == "image"


def truncated_header_of_a_large_png() -> bytes:
    """The first bytes of a 3000x3000 PNG: a header that claims 9 million pixels."""
    return encode(Image.new("L", (3000, 3000)))[:100]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"", "is empty", id="empty"),
        pytest.param(b"hello, not an image", "not a PNG, JPEG or WebP image", id="text"),
        pytest.param(encode(gradient(8, 8), "GIF"), "not a PNG, JPEG or WebP", id="gif-bytes"),
        pytest.param(encode(gradient(8, 8), "BMP"), "not a PNG, JPEG or WebP", id="bmp-bytes"),
        pytest.param(PICTURE[: len(PICTURE) // 2], "truncated or corrupt", id="truncated"),
        pytest.param(b"\x00" * 70_000, "70000 bytes, over this service's limit", id="bytes"),
        # Refused from the header alone: nothing is decoded (the data is cut off anyway).
        pytest.param(truncated_header_of_a_large_png(), "3000x3000 = 9000000 pixels", id="pixels"),
    ],
)
def test_bad_bytes_are_refused_with_a_reason(
    limits: ServiceSettings, data: bytes, reason: str
) -> None:
    with pytest.raises(InputRefused, match=reason) as refused:
        decode_image(data, "mask", limits, "image/png")
    assert refused.value.param == "mask"


def test_pillows_decompression_bomb_guard_stays_on(
    limits: ServiceSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Below Pillow's hard limit (twice MAX_IMAGE_PIXELS) it only warns: the warning refuses too.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40)
    for side in (50, 90):
        with pytest.raises(InputRefused, match="too many pixels"):
            decode_image(encode(gradient(side, side)), "image", limits)


def test_a_photo_is_turned_upright_by_its_exif_orientation(limits: ServiceSettings) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise
    data = encode(gradient(96, 64), "JPEG", exif=exif)
    assert decode_image(data, "image", limits).image.size == (64, 96)


@pytest.mark.parametrize(
    ("input_size", "requested", "expected"),
    [
        pytest.param((96, 64), (128, 256), (128, 256), id="both-set"),
        pytest.param((1000, 500), (None, None), (992, 496), id="own-size-rounded-down"),
        pytest.param((4000, 3000), (None, None), (2048, 1536), id="scaled-into-max"),
        pytest.param((50, 100), (None, None), (64, 128), id="scaled-up-to-min"),
        pytest.param((5000, 100), (None, None), (2048, 64), id="extreme-aspect-clamped"),
        pytest.param((1000, 500), (512, None), (512, 256), id="width-set"),
        pytest.param((1000, 500), (None, 128), (256, 128), id="height-set"),
    ],
)
def test_output_size(
    settings: ServiceSettings,
    input_size: tuple[int, int],
    requested: tuple[int | None, int | None],
    expected: tuple[int, int],
) -> None:
    assert output_size(input_size, *requested, settings) == expected


def three_squares() -> Image.Image:
    """Red, green and blue squares side by side: the centre is green."""
    image = Image.new("RGB", (300, 100), "red")
    image.paste((0, 255, 0), (100, 0, 200, 100))
    image.paste((0, 0, 255), (200, 0, 300, 100))
    return image


def mean_colour(image: Image.Image) -> tuple[int, ...]:
    return tuple(int(value) for value in np.asarray(image).reshape(-1, 3).mean(axis=0).round())


def test_fitting_covers_the_size_and_crops_the_centre(limits: ServiceSettings) -> None:
    upload = encode(three_squares())
    square = read_uploaded(upload, None, limits, width=64, height=64)
    assert mean_colour(square.image.to_pil()) == (0, 255, 0)
    whole = read_uploaded(upload, None, limits, width=192, height=64).image.to_pil()
    assert mean_colour(whole.crop((0, 0, 48, 64))) == (255, 0, 0)
    assert mean_colour(whole.crop((144, 0, 192, 64))) == (0, 0, 255)
    assert square.image.digest == "sha256:" + hashlib.sha256(upload).hexdigest()
    assert square.mask is None


def test_transparency_counts_as_white_in_an_image_and_black_in_a_mask(
    limits: ServiceSettings,
) -> None:
    clear = encode(Image.new("RGBA", (64, 64), (10, 20, 30, 0)))
    inputs = read_uploaded(clear, clear, limits)
    assert set(inputs.image.pixels) == {255}
    assert inputs.mask is not None
    assert set(inputs.mask.pixels) == {0}
    assert (inputs.mask.mode, inputs.mask.width, inputs.mask.height) == ("L", 64, 64)


def test_an_openai_mask_repaints_where_it_is_transparent(limits: ServiceSettings) -> None:
    # OpenAI's convention: alpha 0 is edited, opaque kept, whatever the colours.
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((255, 255, 255, 0), (0, 0, 32, 64))
    mask.paste((9, 9, 9, 128), (32, 0, 40, 64))
    inputs = read_uploaded(encode(gradient(64, 64)), encode(mask), limits, mask_convention="alpha")
    assert inputs.mask is not None
    grey = inputs.mask.to_pil()
    assert set(grey.crop((0, 0, 32, 64)).getdata()) == {255}
    assert set(grey.crop((32, 0, 40, 64)).getdata()) == {127}  # half transparent: half repainted
    assert set(grey.crop((40, 0, 64, 64)).getdata()) == {0}
    assert inputs.mask.digest == "sha256:" + hashlib.sha256(encode(mask)).hexdigest()


def test_an_openai_mask_without_alpha_is_refused(limits: ServiceSettings) -> None:
    opaque = encode(Image.new("RGB", (64, 64), "white"))
    with pytest.raises(InputRefused, match="no alpha channel") as refused:
        read_uploaded(encode(gradient(64, 64)), opaque, limits, mask_convention="alpha")
    assert refused.value.param == "mask"


def test_a_mask_of_another_size_is_refused(limits: ServiceSettings) -> None:
    image = decode_image(encode(gradient(96, 64)), "image", limits)
    mask = decode_image(encode(Image.new("L", (64, 64))), "mask", limits)
    with pytest.raises(InputRefused, match="the mask is 64x64 and the image 96x64") as refused:
        fit_inputs(image, mask, None, None, 0.5, limits)
    assert refused.value.param == "mask"


# Fetching from a real HTTPS host


@pytest.fixture
def host(tmp_path: Path) -> Iterator[ImageHost]:
    with https_image_host(tmp_path) as running:
        running.routes["/picture.png"] = answer(200, PICTURE)
        yield running


@pytest.fixture
def fetching(limits: ServiceSettings, host: ImageHost) -> ServiceSettings:
    """The test host allow-listed, internal (it is on loopback) and trusted."""
    return limits.model_copy(
        update={
            "image_url_hosts": ["LocalHost"],
            "image_url_private_hosts": True,
            "image_fetch_ca_file": host.ca_file,
            "image_fetch_timeout_s": 2.0,
        }
    )


def fetch(url: str, settings: ServiceSettings) -> tuple[bytes, str | None]:
    return asyncio.run(fetch_image(url, "image", settings))


def test_an_allow_listed_host_is_fetched_over_verified_tls(
    fetching: ServiceSettings, host: ImageHost
) -> None:
    assert fetch(host.at("/picture.png"), fetching) == (PICTURE, "image/png")


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        pytest.param({"image_url_hosts": []}, "it has none: send the image as", id="no-hosts"),
        pytest.param({"image_url_hosts": ["images.example.com"]}, "not on this", id="other-host"),
        pytest.param(
            {"image_url_private_hosts": False}, "resolves to a non-public address", id="loopback"
        ),
    ],
)
def test_a_host_the_service_must_not_call_is_refused(
    fetching: ServiceSettings, host: ImageHost, changes: dict[str, object], reason: str
) -> None:
    with pytest.raises(InputRefused, match=reason):
        fetch(host.at("/picture.png"), fetching.model_copy(update=changes))


def test_only_https_is_fetched(fetching: ServiceSettings, host: ImageHost) -> None:
    with pytest.raises(InputRefused, match="scheme must be https"):
        fetch(host.at("/picture.png").replace("https:", "http:"), fetching)


@pytest.mark.parametrize(
    ("route", "reason"),
    [
        pytest.param(answer(404, b"gone", "text/plain"), "answered HTTP 404", id="404"),
        pytest.param(answer(500, b"oops", "text/plain"), "answered HTTP 500", id="500"),
        pytest.param(answer(302, b"", "text/plain"), "answered HTTP 302", id="redirect"),
    ],
)
def test_a_host_that_does_not_answer_2xx_fails_the_fetch(
    fetching: ServiceSettings, host: ImageHost, route: object, reason: str
) -> None:
    host.routes["/x.png"] = route  # type: ignore[assignment]
    with pytest.raises(InputFetchFailed, match=reason):
        fetch(host.at("/x.png"), fetching)


def test_a_host_that_stalls_fails_the_fetch_at_the_deadline(
    fetching: ServiceSettings, host: ImageHost
) -> None:
    host.routes["/slow.png"] = stalled(host.stop)
    with pytest.raises(InputFetchFailed, match=r"took longer than 0\.5 s"):
        fetch(host.at("/slow.png"), fetching.model_copy(update={"image_fetch_timeout_s": 0.5}))


def test_an_untrusted_certificate_fails_the_fetch(
    fetching: ServiceSettings, host: ImageHost
) -> None:
    with pytest.raises(InputFetchFailed, match="CERTIFICATE_VERIFY_FAILED"):
        fetch(host.at("/picture.png"), fetching.model_copy(update={"image_fetch_ca_file": None}))


def test_a_body_over_the_byte_limit_is_refused_while_it_arrives(
    fetching: ServiceSettings, host: ImageHost
) -> None:
    host.routes["/declared.png"] = answer(200, b"\x00" * 70_000)
    host.routes["/endless.png"] = endless(b"\x00" * 8192, host.stop)
    for path in ("/declared.png", "/endless.png"):
        with pytest.raises(InputRefused, match="over this service's limit of 65536 bytes"):
            fetch(host.at(path), fetching)
