"""The embedded tiny models: real classes, reproducible files, the production loading path."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from serve_app.client.cli import main as cli_main
from serve_app.models.tiny import (
    TINY_CLIP_NAME,
    TINY_FLUX_NAME,
    TINY_LORAS_NAME,
    build_tiny_clip,
    build_tiny_flux,
    build_tiny_loras,
    ensure_tiny_model,
)


def file_digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize(
    "build", [build_tiny_flux, build_tiny_loras, build_tiny_clip], ids=["flux", "loras", "clip"]
)
def test_building_twice_gives_identical_files(build, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = file_digests(build(tmp_path / "first"))
    second = file_digests(build(tmp_path / "second"))
    assert first == second
    assert any(name.endswith(".safetensors") for name in first)


def test_tiny_flux_is_a_real_flux_pipeline_on_disk(tmp_path: Path) -> None:
    import json

    from diffusers import FluxPipeline

    folder = build_tiny_flux(tmp_path / "flux")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert (folder / "tokenizer" / "tokenizer.json").is_file()
    assert (folder / "tokenizer_2" / "tokenizer.json").is_file()
    pipeline = FluxPipeline.from_pretrained(folder)
    assert pipeline.vae_scale_factor == 8  # as in production FLUX.1
    assert pipeline.transformer.config.guidance_embeds is False  # like schnell
    assert pipeline.tokenizer("a red cat").input_ids[0] == pipeline.tokenizer.bos_token_id


def test_ensure_builds_once_then_reuses(tmp_path: Path) -> None:
    first = ensure_tiny_model(TINY_CLIP_NAME, tmp_path)
    marker = first / "config.json"
    stamp = marker.stat().st_mtime_ns
    assert ensure_tiny_model(TINY_CLIP_NAME, tmp_path) == first
    assert marker.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [TINY_CLIP_NAME]  # no staging folder left


def test_cli_builds_every_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli_main(["build-tiny-models", str(tmp_path)])
    printed = capsys.readouterr().out.split()
    names = [TINY_FLUX_NAME, TINY_LORAS_NAME, TINY_CLIP_NAME]
    assert printed == [str(tmp_path / name) for name in names]


def test_console_script_is_installed(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("flux-serve")
    result = subprocess.run(
        [str(script), "build-tiny-models", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(tmp_path / TINY_FLUX_NAME) in result.stdout
