"""LoRA adapters on the tiny FLUX: what they do to the pixels, how a worker caches them, and the
API around them (GET /loras, 422s naming the entry, sampling_params that reproduce the image)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

from serve_app.api.routes import create_app
from serve_app.generation.adapter_library import AdapterRefused
from serve_app.generation.pipeline import FluxGenerator
from serve_app.generation.planning import SamplingJob
from serve_app.generation.scheduling import RenderScheduler
from serve_app.schemas import Lora, SamplingParams
from serve_app.settings import ServiceSettings
from serve_app.storage.local import LocalImageStore

from .conftest import MakeService
from .images import data_url, encode, gradient, mean_abs_difference
from .live_server import always_ready, serve_over_http
from .loras import ATTENTION, CONTEXT, EVERYTHING, MISFIT, MLP, mixed_library

BASE = SamplingParams(sampler="euler", steps=4, cfg_scale=1.0, seed=11, width=64, height=64)


def resolved(generator: FluxGenerator, *loras: Lora) -> tuple[Lora, ...]:
    assert generator.adapters is not None
    return generator.adapters.library.resolve(loras)  # type: ignore[attr-defined,no-any-return]


def job(loras: tuple[Lora, ...] = (), index: int = 0, **changes: object) -> SamplingJob:
    params = BASE.model_copy(update={"loras": loras, **changes})
    return SamplingJob(index=index, prompt="a red cat", negative_prompt=None, params=params)


def render_one(generator: FluxGenerator, sampling_job: SamplingJob) -> bytes:
    (image,) = generator.render([sampling_job])
    return image.data


@pytest.mark.parametrize("name", [ATTENTION, CONTEXT, MLP, EVERYTHING])
def test_an_adapter_changes_the_pixels_at_scale_one_and_none_at_scale_zero(
    generator: FluxGenerator, name: str
) -> None:
    base = render_one(generator, job())
    (lora,) = resolved(generator, Lora(name=name))
    assert mean_abs_difference(render_one(generator, job((lora,))), base) > 1.0
    zero = lora.model_copy(update={"scale": 0.0})
    assert render_one(generator, job((zero,))) == base  # bit for bit: the base model's
    assert render_one(generator, job()) == base  # and none left active after it


def test_two_adapters_together_differ_from_each_alone(generator: FluxGenerator) -> None:
    attention, mlp = resolved(generator, Lora(name=ATTENTION), Lora(name=MLP, scale=0.5))
    together = render_one(generator, job((attention, mlp)))
    for alone in (attention, mlp):
        assert mean_abs_difference(together, render_one(generator, job((alone,)))) > 1.0
    # Applied at another scale, the pair makes another image.
    stronger = mlp.model_copy(update={"scale": 1.0})
    assert mean_abs_difference(together, render_one(generator, job((attention, stronger)))) > 1.0


def test_an_image_with_adapters_is_the_same_batched_or_alone(generator: FluxGenerator) -> None:
    loras = resolved(generator, Lora(name=EVERYTHING, scale=1.5), Lora(name=CONTEXT, scale=-1.0))
    batch = [job(loras, index=i, seed=100 + i) for i in range(3)]
    for sampling_job, rendered in zip(batch, generator.render(batch), strict=True):
        assert mean_abs_difference(rendered.data, render_one(generator, sampling_job)) <= 1.0


def test_other_adapters_or_scales_never_share_a_pipeline_call(generator: FluxGenerator) -> None:
    (attention,) = resolved(generator, Lora(name=ATTENTION))
    weaker = attention.model_copy(update={"scale": 0.5})
    keys = {job(loras).batch_key() for loras in [(), (attention,), (weaker,)]}
    assert len(keys) == 3
    with pytest.raises(ValueError, match="batch key"):
        generator.render([job((attention,)), job((weaker,))])


def test_the_cache_keeps_the_most_recently_used_within_its_bounds(
    settings: ServiceSettings,
) -> None:
    generator = FluxGenerator(settings.model_copy(update={"lora_cache_size": 3, "warmup": False}))
    adapters = generator.adapters
    assert adapters is not None
    attention, context, mlp, everything = resolved(
        generator, Lora(name=ATTENTION), Lora(name=CONTEXT), Lora(name=MLP), Lora(name=EVERYTHING)
    )
    for loras in [(attention,), (context, mlp), (attention,), (everything,)]:
        adapters.activate(loras)
    # Four adapters, room for three: context went, the one used longest ago.
    assert adapters.loaded == [mlp.digest, attention.digest, everything.digest]
    assert (adapters.counts.misses, adapters.counts.hits, adapters.counts.evictions) == (4, 1, 1)  # type: ignore[attr-defined]
    # The evicted adapter is gone from the transformer too, and comes back on demand.
    assert len(generator.pipeline.transformer.peft_config) == 3
    base = render_one(generator, job())
    assert mean_abs_difference(render_one(generator, job((context,))), base) > 1.0


def test_the_cache_holds_no_more_bytes_than_it_may(settings: ServiceSettings) -> None:
    # Room for the biggest tiny adapter (tiny-everything, 12 kB in float32), not beside another.
    bounded = settings.model_copy(update={"lora_cache_bytes": 16_000, "warmup": False})
    generator = FluxGenerator(bounded)
    adapters = generator.adapters
    assert adapters is not None
    attention, everything = resolved(generator, Lora(name=ATTENTION), Lora(name=EVERYTHING))
    adapters.activate((attention,))
    adapters.activate((everything,))
    assert adapters.loaded == [everything.digest]
    with pytest.raises(AdapterRefused, match="FLUX_SERVE_LORA_CACHE_BYTES") as refused:
        adapters.activate((everything, attention))
    assert refused.value.param == "loras.1.name"
    render_one(generator, job((attention,)))  # it still serves the adapters one at a time


def test_adapters_apply_on_a_quantized_transformer(settings: ServiceSettings) -> None:
    """Loaded after quantizing, an adapter keeps its own precision beside the int8 weights."""
    quantized = FluxGenerator(
        settings.model_copy(update={"quantize": "int8_weight_only", "warmup": False})
    )
    base = render_one(quantized, job())
    (mlp,) = resolved(quantized, Lora(name=MLP))
    assert mean_abs_difference(render_one(quantized, job((mlp,))), base) > 1.0
    assert render_one(quantized, job()) == base


# The API, on a library that also holds files no request may use


@pytest.fixture(scope="module")
def mixed_settings(settings: ServiceSettings, tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = mixed_library(settings, tmp_path_factory.mktemp("adapters") / "library")
    return settings.model_copy(update={"lora_dir": folder, "warmup": False})


@pytest.fixture(scope="module")
def mixed_generator(mixed_settings: ServiceSettings) -> FluxGenerator:
    return FluxGenerator(mixed_settings)


@pytest.fixture
def url(
    mixed_settings: ServiceSettings,
    mixed_generator: FluxGenerator,
    make_service: MakeService,
    store: LocalImageStore,
) -> Iterator[str]:
    scheduler = RenderScheduler(mixed_generator, max_batch_size=4, across_calls=True)
    service = make_service(mixed_settings, store, render_with=scheduler.render)
    with serve_over_http(create_app(service, always_ready)) as base_url:
        yield base_url


REQUEST: dict[str, Any] = {"prompt": "a red cat", "nof_images": 2, "width": 64, "height": 64}


def test_get_loras_lists_the_library(url: str) -> None:
    listing = httpx.get(f"{url}/loras").json()
    names = [item["name"] for item in listing["loras"]]
    assert names == sorted(names)
    assert {ATTENTION, CONTEXT, MLP, EVERYTHING, MISFIT} <= set(names)
    attention = next(item for item in listing["loras"] if item["name"] == ATTENTION)
    assert set(attention) == {"name", "digest", "size_bytes", "rank", "alpha", "layers", "modules"}
    assert "text-encoder" in {item["name"] for item in listing["refused"]}
    assert listing["max_per_request"] == 3


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(
    ("loras", "param", "words"),
    [
        pytest.param([{"name": "nobody"}], "loras.0.name", "no adapter", id="unknown"),
        pytest.param(
            [{"name": ATTENTION}, {"name": "text-encoder"}],
            "loras.1.name",
            "only adapters of the transformer",
            id="text-encoder",
        ),
        pytest.param([{"name": "../etc/passwd"}], "loras.0.name", "pattern", id="a-path"),
        pytest.param(
            [{"name": ATTENTION, "scale": 9}], "loras.0.scale", "less than or equal", id="scale"
        ),
        pytest.param([{"name": "x"}] * 4, "loras", "at most 3", id="too-many"),
    ],
)
def test_a_request_with_an_unusable_adapter_is_a_422_naming_it(
    url: str, loras: list[dict[str, Any]], param: str, words: str, stream: bool
) -> None:
    response = httpx.post(
        f"{url}/generate", json={**REQUEST, "loras": loras, "stream": stream}, timeout=60
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert words in error["message"]


def test_a_misfit_found_by_the_worker_is_a_422_and_the_worker_goes_on(url: str) -> None:
    """A well-formed LoRA of another model passes the ingress; the worker refuses it, failing
    only the request that asked for it."""

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            misfit = {**REQUEST, "loras": [{"name": ATTENTION}, {"name": MISFIT}]}
            good = {**REQUEST, "nof_images": 4, "loras": [{"name": MLP}]}
            refused, served = await asyncio.gather(
                client.post("/generate", json=misfit), client.post("/generate", json=good)
            )
            return refused, served

    refused, served = asyncio.run(scenario())
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["param"] == "loras.1.name"
    assert "does not fit the served model" in error["message"]
    assert served.status_code == 200, served.text
    assert served.json()["count"] == 4
    after = httpx.post(f"{url}/generate", json={**REQUEST, "loras": [{"name": ATTENTION}]})
    assert after.status_code == 200


def test_sampling_params_carry_the_adapters_and_reproduce_the_image(url: str) -> None:
    loras = [{"name": ATTENTION, "scale": 0.8}, {"name": CONTEXT, "scale": -1.0}]
    first = httpx.post(f"{url}/generate", json={**REQUEST, "loras": loras}, timeout=60).json()
    digests = {item["name"]: item["digest"] for item in httpx.get(f"{url}/loras").json()["loras"]}
    for image in first["images"]:
        params = image["sampling_params"]
        assert params["loras"] == [{**lora, "digest": digests[str(lora["name"])]} for lora in loras]
        again = httpx.post(
            f"{url}/generate",
            json={
                "prompt": "a red cat",
                "nof_images": 1,
                "base_seed": params["seed"],
                "width": params["width"],
                "height": params["height"],
                "diversity": {"seeds": "fixed"},
                "loras": params["loras"],  # as given back, digests included
            },
            timeout=60,
        ).json()["images"][0]
        assert again["sampling_params"] == params
        original = httpx.get(image["url"]).content
        # Made in a batch of two first, alone now.
        assert mean_abs_difference(original, httpx.get(again["url"]).content) <= 1.0


def test_adapters_apply_to_images_made_from_an_input_image(url: str) -> None:
    """The image pipelines share the transformer that holds the adapters."""
    body = {**REQUEST, "image": data_url(encode(gradient(64, 64))), "strength": 0.75}
    plain = httpx.post(f"{url}/generate", json=body, timeout=60).json()["images"]
    loras = [{"name": EVERYTHING, "scale": 1.5}]
    adapted = httpx.post(f"{url}/generate", json={**body, "loras": loras}, timeout=60).json()
    for without, with_adapter in zip(plain, adapted["images"], strict=True):
        params = with_adapter["sampling_params"]
        assert params["image_digest"] is not None
        assert [lora["name"] for lora in params["loras"]] == [EVERYTHING]
        assert params["seed"] == without["sampling_params"]["seed"]
        difference = mean_abs_difference(
            httpx.get(without["url"]).content, httpx.get(with_adapter["url"]).content
        )
        assert difference > 1.0


def test_with_compile_on_changing_adapters_never_recompiles(
    settings: ServiceSettings, generator: FluxGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hot-swapping into fixed slots: the graph compiled for the first image serves every
    adapter set and scale after it. A compile backend that counts stands in for inductor."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    real_compile = torch.compile

    def counting_compile(model: Any, *, fullgraph: bool = False, **_: Any) -> Any:
        return real_compile(model, backend=counter, fullgraph=fullgraph)

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", counting_compile)
    compiled = FluxGenerator(
        settings.model_copy(update={"compile_mode": "default", "warmup": False})
    )
    small = {"width": 64, "height": 64, "steps": 2}
    base = render_one(compiled, job(**small))
    frames = counter.frame_count
    assert frames > 0
    attention, context, mlp, everything = resolved(
        compiled, Lora(name=ATTENTION), Lora(name=CONTEXT), Lora(name=MLP), Lora(name=EVERYTHING)
    )
    for loras in [
        (attention,),
        (mlp, context.model_copy(update={"scale": -1.0})),
        (everything, attention, mlp),
        (attention.model_copy(update={"scale": 0.3}),),
    ]:
        image = render_one(compiled, job(loras, **small))
        assert mean_abs_difference(image, base) > 0.5
        # What the uncompiled worker makes, within rounding: slots pad ranks with zeros.
        assert mean_abs_difference(image, render_one(generator, job(loras, **small))) <= 1.0
    assert render_one(compiled, job(**small)) == base
    assert counter.frame_count == frames
    torch._dynamo.reset()
