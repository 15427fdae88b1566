"""The adapter library: what it lists, what it refuses and why, in a folder and in S3 (SeaweedFS);
and the workers' adapter cache."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from serve_app.generation.adapter_cache import AdapterCache, OverBudget
from serve_app.generation.adapter_files import read_adapter
from serve_app.generation.adapter_library import AdapterLibrary, AdapterRefused
from serve_app.generation.adapter_sources import FolderSource, S3Source
from serve_app.models.tiny import TINY_LORAS_NAME, ensure_tiny_model
from serve_app.models.tiny_loras import TINY_LORAS
from serve_app.schemas import Lora
from serve_app.settings import ServiceSettings

from .loras import ATTENTION, BAD_FILES, EVERYTHING, MISFIT, MLP, mixed_library, tiny_library
from .s3_server import SeaweedS3


@pytest.fixture(scope="module")
def mixed(settings: ServiceSettings, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mixed_library(settings, tmp_path_factory.mktemp("library") / "loras")


def folder_library(settings: ServiceSettings, folder: Path, **changes: object) -> AdapterLibrary:
    return AdapterLibrary(settings.model_copy(update=changes), FolderSource(folder))


def test_the_listing_has_each_tiny_lora_and_refuses_each_bad_file(
    settings: ServiceSettings, mixed: Path
) -> None:
    listing = folder_library(settings, mixed).listing()
    usable = {info.name: info for info in listing.loras}
    # The misfit is a well-formed LoRA: only a worker, which has the model, can tell.
    assert set(usable) == {spec.name for spec in TINY_LORAS} | {MISFIT}
    attention = usable[ATTENTION]
    assert (attention.rank, attention.alpha, attention.modules) == (4, 4.0, 7)
    assert "transformer_blocks.*.attn.to_q" in attention.layers
    assert "single_transformer_blocks.*.attn.to_k" in attention.layers
    assert attention.size_bytes == (mixed / f"{ATTENTION}.safetensors").stat().st_size
    assert attention.digest.startswith("sha256:")
    assert usable[MLP].rank == 8
    refused = {item.name: item.reason for item in listing.refused}
    assert set(refused) == {*BAD_FILES, "garbage"}
    for name, (_, words) in BAD_FILES.items():
        assert words in refused[name], (name, refused[name])
    assert listing.max_per_request == settings.max_loras


@pytest.mark.parametrize(
    ("loras", "param", "words"),
    [
        pytest.param([Lora(name="nobody")], "loras.0.name", "no adapter 'nobody'", id="unknown"),
        pytest.param(
            [Lora(name=ATTENTION), Lora(name="text-encoder")],
            "loras.1.name",
            "text encoder",
            id="text-encoder",
        ),
        pytest.param(
            [Lora(name="kohya")], "loras.0.name", "not a diffusers/peft FLUX LoRA", id="not-peft"
        ),
        pytest.param(
            [Lora(name=ATTENTION), Lora(name=MLP), Lora(name=ATTENTION, scale=0.5)],
            "loras.2.name",
            "listed twice",
            id="twice",
        ),
        pytest.param(
            [Lora(name=ATTENTION, digest="sha256:" + "0" * 64)],
            "loras.0.digest",
            "has changed",
            id="other-digest",
        ),
    ],
)
def test_a_request_naming_an_unusable_adapter_is_refused_by_its_entry(
    settings: ServiceSettings, mixed: Path, loras: list[Lora], param: str, words: str
) -> None:
    with pytest.raises(AdapterRefused) as refused:
        folder_library(settings, mixed).resolve(loras)
    assert refused.value.param == param
    assert words in refused.value.reason


def test_an_adapter_over_the_size_limit_is_refused(settings: ServiceSettings, mixed: Path) -> None:
    limit = (mixed / f"{ATTENTION}.safetensors").stat().st_size
    library = folder_library(settings, mixed, lora_max_bytes=limit)
    assert library.resolve([Lora(name=ATTENTION)])[0].digest is not None
    with pytest.raises(AdapterRefused, match="FLUX_SERVE_LORA_MAX_BYTES") as refused:
        library.resolve([Lora(name=ATTENTION), Lora(name=EVERYTHING)])
    assert refused.value.param == "loras.1.name"


def test_resolving_pins_digests_and_notices_a_changed_file(
    settings: ServiceSettings, tmp_path: Path
) -> None:
    folder = tiny_library(settings, tmp_path / "loras")
    library = folder_library(settings, folder)
    (pinned,) = library.resolve([Lora(name=ATTENTION, scale=0.5)])
    assert (pinned.name, pinned.scale) == (ATTENTION, 0.5)
    assert library.resolve([pinned]) == (pinned,)
    assert library.load(pinned, 0).file.rank == 4
    # The file is replaced by another adapter's: the pinned digest no longer matches.
    (folder / f"{MLP}.safetensors").replace(folder / f"{ATTENTION}.safetensors")
    with pytest.raises(AdapterRefused, match="has changed") as refused:
        library.resolve([pinned])
    assert refused.value.param == "loras.0.digest"
    with pytest.raises(AdapterRefused, match="has changed"):
        library.load(pinned, 0)


def test_a_deployment_without_a_library_refuses_every_adapter(tmp_path: Path) -> None:
    settings = ServiceSettings(model=str(tmp_path / "my-flux"))
    library = AdapterLibrary(settings)
    assert library.listing().loras == []
    assert library.listing().max_per_request == 0
    with pytest.raises(AdapterRefused, match="serves no LoRA adapters"):
        library.resolve([Lora(name=ATTENTION)])


def test_settings_refuse_fused_projections_with_adapters() -> None:
    with pytest.raises(ValueError, match="fuse_qkv can't be combined with LoRA adapters"):
        ServiceSettings(fuse_qkv=True)
    assert ServiceSettings(fuse_qkv=True, max_loras=0).serves_loras is False


def test_a_library_in_s3_lists_refuses_and_loads_like_a_folder(
    settings: ServiceSettings, mixed: Path, s3: SeaweedS3
) -> None:
    bucket = f"loras-{uuid.uuid4().hex[:8]}"
    client = s3.client()
    client.create_bucket(Bucket=bucket)
    for path in mixed.iterdir():
        client.put_object(Bucket=bucket, Key=f"flux/{path.name}", Body=path.read_bytes())
    client.put_object(Bucket=bucket, Key="elsewhere/tiny-mlp.safetensors", Body=b"not here")
    s3_settings = settings.model_copy(
        update={"s3_endpoint_url": s3.endpoint, "s3_addressing_style": "path"}
    )
    url = f"s3://{bucket}/flux/"
    in_s3 = AdapterLibrary(s3_settings, S3Source(url, s3_settings))
    in_folder = folder_library(settings, mixed)
    assert in_s3.listing() == in_folder.listing()
    requested = [Lora(name=MLP, scale=0.5), Lora(name=ATTENTION)]
    resolved = in_s3.resolve(requested)
    assert resolved == in_folder.resolve(requested)
    loaded = in_s3.load(resolved[0], 0)
    assert set(loaded.tensors) == set(in_folder.load(resolved[0], 0).tensors)
    with pytest.raises(AdapterRefused, match="text encoder"):
        in_s3.resolve([Lora(name="text-encoder")])


def test_a_tiny_lora_file_reads_from_its_header_alone(settings: ServiceSettings) -> None:
    folder = ensure_tiny_model(TINY_LORAS_NAME, settings.cache_dir)
    data = (folder / f"{MLP}.safetensors").read_bytes()
    length = int.from_bytes(data[:8], "little")
    adapter = read_adapter(data[8 : 8 + length], len(data))
    config = adapter.lora_config()
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (8, 4.0, {})
    assert "transformer_blocks.0.ff.net.2" in config["target_modules"]
    with pytest.raises(ValueError, match="truncated"):
        read_adapter(data[8 : 8 + length], len(data) - 1)


def test_the_cache_evicts_the_least_recently_used_within_count_and_bytes() -> None:
    evicted: list[str] = []
    cache: AdapterCache[str] = AdapterCache(3, 100, lambda digest, _: evicted.append(digest))
    for digest in ("a", "b", "c"):
        assert cache.make_room(30, keep=[digest]) == []
        cache.add(digest, digest.upper(), 30)
    assert cache.get("a") == "A"  # now b is the least recently used
    assert cache.make_room(30, keep=["d"]) == ["b"]
    cache.add("d", "D", 30)
    assert cache.digests == ["c", "a", "d"]
    # Bytes bound it too: 60 bytes need two to go, but never one the batch needs.
    assert cache.make_room(60, keep=["c"]) == ["a", "d"]
    assert evicted == ["b", "a", "d"]
    with pytest.raises(OverBudget, match="FLUX_SERVE_LORA_CACHE_BYTES"):
        cache.make_room(80, keep=["c"])
    assert cache.get("b") is None
