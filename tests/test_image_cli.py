"""``flux-serve generate --image FILE --mask FILE --strength S`` against the in-process app."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from serve_app.client import FluxClient, image_data_url
from serve_app.client.cli import ExitCode
from serve_app.client.images import media_type_of
from serve_app.schemas import Diversity, GenerateRequest

from .images import encode, gradient, mean_abs_difference, pixels
from .test_client_cli import PROMPT, run_cli


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    path = tmp_path / "picture.jpg"
    path.write_bytes(encode(gradient(100, 70), "JPEG"))
    return path


def test_cli_makes_images_from_an_input_image_and_a_mask(
    live_url: str, tmp_path: Path, picture: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mask = tmp_path / "mask.png"
    mask.write_bytes(encode(Image.new("L", (100, 70), 255)))
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys,
        *("generate", PROMPT, "-n", "2", "--seeds", "fixed", "--base-seed", "4"),
        *("--image", str(picture), "--mask", str(mask), "--strength", "0.6"),
        *("--out", str(out), "--url", live_url),
    )
    assert code == ExitCode.OK, err
    saved = sorted(out.iterdir())
    assert len(saved) == 2
    assert pixels(saved[0].read_bytes()).shape == (64, 96, 3)  # the input's size, rounded down
    # The command sent the files as the API takes them: the same request makes the same pixels.
    request = GenerateRequest(
        prompt=PROMPT,
        nof_images=2,
        base_seed=4,
        diversity=Diversity(seeds="fixed"),
        image=image_data_url(picture),
        mask=image_data_url(mask),
        strength=0.6,
    )
    with FluxClient(live_url) as client:
        again = client.generate(request).images
        assert {image.sampling_params.mode for image in again} == {"inpainting"}
        for path, image in zip(saved, again, strict=True):
            assert mean_abs_difference(path.read_bytes(), client.download(image)) == 0


def test_cli_refuses_a_missing_file_before_calling_the_service(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "generate", PROMPT, "--image", str(tmp_path / "nope.png"))
    assert code == ExitCode.REFUSED
    assert "No such file or directory" in err


def test_cli_shows_why_the_service_refused_an_input(
    live_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    animation = tmp_path / "cat.gif"
    animation.write_bytes(encode(gradient(8, 8), "GIF"))
    code, _, err = run_cli(capsys, "generate", PROMPT, "--image", str(animation), "--url", live_url)
    assert code == ExitCode.REFUSED
    assert "unsupported image format 'image/gif'" in err
    assert "param: image" in err


@pytest.mark.parametrize(
    ("data", "name", "media_type"),
    [
        (encode(gradient(8, 8), "PNG"), "x.bin", "image/png"),
        (encode(gradient(8, 8), "JPEG"), "x.png", "image/jpeg"),
        (encode(gradient(8, 8), "WEBP"), "x", "image/webp"),
        (b"GIF89a...", "x.gif", "image/gif"),
        (b"\x00\x01", "x", "application/octet-stream"),
    ],
)
def test_a_files_media_type_comes_from_its_bytes(data: bytes, name: str, media_type: str) -> None:
    assert media_type_of(data, name) == media_type
