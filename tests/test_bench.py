"""The throughput benchmark's parts that need no cluster and no timing: presets, plan, statistics,
request timing against a scripted stream, the Serve config it deploys, and the report."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import torch

from bench import jobs as jobs_bench
from bench import presets
from bench.cluster import WORKER_DEPLOYMENT, ServiceSetup, serve_config
from bench.gpu_run import Budget, PipelineRow, ResultsFile, ServiceRow, skipped
from bench.image_timing import ImageInputFigures, input_picture, time_image_inputs
from bench.lora_timing import MixFigures, SwitchFigures, ensure_loras, measure_switches
from bench.lora_timing import bodies as lora_bodies
from bench.loras import LoraResults
from bench.loras import to_markdown as lora_markdown
from bench.report import (
    Results,
    SharingFigures,
    Target,
    best_batch_size,
    replica_note,
    to_markdown,
    to_text,
)
from bench.service_timing import RequestTiming, ServiceError, ServiceFigures, timed_request
from bench.speedup_timing import SpeedupFigures, SpeedupTimer
from bench.stats import median, percentile
from bench.workload import Workload
from serve_app.generation.pipeline import FluxGenerator
from serve_app.models.tiny import TINY_FLUX_NAME, ensure_tiny_model
from serve_app.models.tiny_loras import TINY_LORAS
from serve_app.settings import ServiceSettings

WORKLOAD = Workload(prompt="a red cat", images=16, size=256, steps=4)


def test_small_preset_is_a_loadable_flux_pipeline_of_millions_of_parameters(tmp_path: Path) -> None:
    from diffusers import FluxPipeline

    folder = presets.build_preset(presets.PRESETS["small"], tmp_path / "small")
    pipeline = FluxPipeline.from_pretrained(folder)
    config = pipeline.transformer.config
    assert (config.attention_head_dim, config.num_attention_heads) == (64, 4)
    assert config.joint_attention_dim == pipeline.text_encoder_2.config.d_model
    assert config.pooled_projection_dim == pipeline.text_encoder.config.hidden_size
    parameters = sum(parameter.numel() for parameter in pipeline.transformer.parameters())
    assert 3_000_000 < parameters < 20_000_000
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(
        "a red cat", num_inference_steps=1, width=64, height=64, max_sequence_length=16
    ).images[0]
    assert image.size == (64, 64)


def test_full_preset_has_flux_schnell_architecture() -> None:
    with torch.device("meta"):
        pipeline = presets.build_pipeline(presets.PRESETS["full"])
    transformer = pipeline.transformer.config
    assert (transformer.num_layers, transformer.num_single_layers) == (19, 38)
    assert transformer.num_attention_heads * transformer.attention_head_dim == 3072
    assert transformer.guidance_embeds is False
    assert transformer.joint_attention_dim == pipeline.text_encoder_2.config.d_model == 4096
    assert transformer.pooled_projection_dim == pipeline.text_encoder.config.hidden_size == 768
    assert pipeline.vae.config.latent_channels * 4 == transformer.in_channels
    assert pipeline.vae_scale_factor == 8
    assert pipeline.transformer.dtype == torch.bfloat16
    counts = presets.parameter_counts(presets.PRESETS["full"])
    assert 11.5e9 < counts["transformer"] < 12.5e9
    assert 4.5e9 < counts["text_encoder_2"] < 5.0e9


def test_full_preset_explains_why_it_cannot_run_on_a_small_cpu_machine(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(presets, "available_memory_bytes", lambda: 24 * 2**30)
    cpu = torch.device("cpu")
    message = presets.shortfall(presets.PRESETS["full"], cpu, torch.float32, tmp_path)
    assert message is not None
    assert "'full'" in message
    assert "GiB of memory" in message
    assert presets.shortfall(presets.PRESETS["small"], cpu, torch.float32, tmp_path) is None


def test_full_preset_runs_at_reduced_depth_where_it_does_not_fit(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(presets, "available_memory_bytes", lambda: 24 * 2**30)
    cpu = torch.device("cpu")
    full = presets.PRESETS["full"]
    chosen, problem = presets.runnable_preset(full, cpu, torch.float32, tmp_path)
    assert (chosen, problem) == (full.reduced, None)
    # Where it fits, it runs whole.
    monkeypatch.setattr(presets, "available_memory_bytes", lambda: 2**40)
    assert presets.runnable_preset(full, cpu, torch.float32, tmp_path) == (full, None)
    small = presets.PRESETS["small"]
    assert presets.runnable_preset(small, cpu, torch.float32, tmp_path) == (small, None)


def test_reduced_full_preset_keeps_every_width_of_flux_schnell() -> None:
    reduced = presets.PRESETS["full"].reduced
    assert reduced is not None
    with torch.device("meta"):
        whole = presets.build_pipeline(presets.PRESETS["full"])
        small = presets.build_pipeline(reduced)
    for name in ("transformer", "text_encoder_2"):
        reduced_config, whole_config = (
            config.to_dict() if hasattr(config, "to_dict") else dict(config)
            for config in (getattr(small, name).config, getattr(whole, name).config)
        )
        depths = {"num_layers", "num_single_layers", "num_decoder_layers"}
        changed = {key for key in whole_config if reduced_config.get(key) != whole_config[key]}
        assert changed <= depths, changed
    assert (small.transformer.config.num_layers, small.transformer.config.num_single_layers) == (
        1,
        1,
    )
    assert small.text_encoder_2.config.num_layers == 1
    counts = presets.parameter_counts(reduced)
    assert 0.4e9 < counts["transformer"] < 0.7e9
    # CLIP-L and the VAE are whole.
    assert (
        counts["text_encoder"] == presets.parameter_counts(presets.PRESETS["full"])["text_encoder"]
    )


def test_workload_plans_the_services_jobs() -> None:
    jobs = WORKLOAD.jobs(ServiceSettings(default_width=128, default_height=128))
    assert len(jobs) == 16
    assert len({job.batch_key() for job in jobs}) == 1  # one pipeline call can make any batch
    assert len({job.params.seed for job in jobs}) == 16
    assert {(job.params.width, job.params.steps, job.params.sampler) for job in jobs} == {
        (256, 4, "euler")
    }


@pytest.mark.parametrize(
    ("values", "fraction", "expected"),
    [
        ([3.0], 0.95, 3.0),
        ([4.0, 1.0, 3.0, 2.0], 0.5, 2.5),
        ([float(value) for value in range(1, 21)], 0.95, 19.05),
        ([5.0, 1.0, 9.0], 0.0, 1.0),
        ([5.0, 1.0, 9.0], 1.0, 9.0),
    ],
    ids=["single", "even-median", "p95", "min", "max"],
)
def test_percentile(values: list[float], fraction: float, expected: float) -> None:
    assert percentile(values, fraction) == pytest.approx(expected)


def test_median_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="no values"):
        median([])


def test_best_batch_size_takes_the_fastest_and_the_smaller_on_a_tie() -> None:
    assert best_batch_size({1: 5.0, 2: 7.0, 4: 9.0, 8: 8.0}) == 4
    assert best_batch_size({8: 9.0, 4: 9.0, 1: 2.0}) == 4


def sse(*events: tuple[str, dict[str, object]]) -> bytes:
    return "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events).encode()


def time_scripted(body: bytes, status: int = 200) -> RequestTiming:
    """Time one request against a server that answers ``body`` at once."""
    transport = httpx.MockTransport(lambda _: httpx.Response(status, content=body))

    async def run() -> RequestTiming:
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            return await timed_request(client, WORKLOAD.request_body(stream=True))

    return asyncio.run(run())


def test_timed_request_counts_streamed_images() -> None:
    images: list[tuple[str, dict[str, object]]] = [("image", {"index": i}) for i in range(16)]
    timing = time_scripted(sse(*images, ("result", {"count": 16})))
    assert timing.images == 16
    assert 0 < timing.first_image_s <= timing.latency_s


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (sse(("image", {}), ("error", {"error": {"type": "storage"}})), 200, "stream failed"),
        (sse(("image", {})), 200, "without a result"),
        (sse(("image", {}), ("result", {})), 200, "expected 16 image events, got 1"),
        (b'{"error": {"type": "invalid_request"}}', 422, "answered 422"),
    ],
    ids=["error-event", "cut-short", "missing-images", "refused"],
)
def test_timed_request_fails_loudly(body: bytes, status: int, message: str) -> None:
    with pytest.raises(ServiceError, match=message):
        time_scripted(body, status)


def setup(gpus: int) -> ServiceSetup:
    return ServiceSetup(
        model=Path("/models/small"),
        cache_dir=Path("/cache"),
        size=256,
        max_batch_size=8,
        ray_cpus=8,
        gpus=gpus,
    )


def test_serve_config_changes_only_the_benchmarks_settings(tmp_path: Path) -> None:
    config = serve_config(setup(gpus=0), 18123, tmp_path / "images")
    assert config["http_options"] == {"host": "127.0.0.1", "port": 18123}
    (application,) = config["applications"]
    env = application["runtime_env"]["env_vars"]
    assert env["FLUX_SERVE_MODEL"] == "/models/small"
    assert env["FLUX_SERVE_MAX_BATCH_SIZE"] == "8"
    assert env["FLUX_SERVE_BATCH_ACROSS_REQUESTS"] == "true"
    assert env["FLUX_SERVE_DEFAULT_WIDTH"] == env["FLUX_SERVE_DEFAULT_HEIGHT"] == "256"
    assert env["FLUX_SERVE_STORAGE_DIR"] == str(tmp_path / "images")
    assert env["FLUX_SERVE_SCORER_MODEL"] == "tiny"  # kept as shipped
    names = [deployment["name"] for deployment in application["deployments"]]
    assert WORKER_DEPLOYMENT in names


def test_serve_config_can_give_each_request_batches_of_its_own(tmp_path: Path) -> None:
    config = serve_config(replace(setup(gpus=0), batch_across_requests=False), 18123, tmp_path)
    env = config["applications"][0]["runtime_env"]["env_vars"]
    value = env["FLUX_SERVE_BATCH_ACROSS_REQUESTS"]
    assert not ServiceSettings.model_validate(
        {"batch_across_requests": value}
    ).batch_across_requests
    assert value == "false"


def test_serve_config_gives_each_worker_a_gpu_where_there_are_gpus(tmp_path: Path) -> None:
    config = serve_config(setup(gpus=1), 18123, tmp_path)
    (worker,) = [
        deployment
        for deployment in config["applications"][0]["deployments"]
        if deployment["name"] == WORKER_DEPLOYMENT
    ]
    assert worker["ray_actor_options"]["num_gpus"] == 1
    if "autoscaling_config" in worker:
        assert worker["autoscaling_config"]["max_replicas"] == 1


def figures(concurrency: int, images_per_s: float, replicas: tuple[int, int]) -> ServiceFigures:
    return ServiceFigures(
        concurrency=concurrency,
        images_per_s=images_per_s,
        latency_p50_s=2.0,
        latency_p95_s=2.5,
        first_image_p50_s=0.6,
        first_image_p95_s=0.8,
        requests=6,
        worker_replicas=replicas,
    )


def speedup(name: str, latency_s: float, images_per_s: float) -> SpeedupFigures:
    return SpeedupFigures(
        name=name,
        image_latency_s=latency_s,
        images_per_s=images_per_s,
        pixel_difference=0.25,
        warmup_s=1.0,
    )


RESULTS = Results(
    preset="small",
    preset_description="a test model",
    workload=WORKLOAD,
    repeats=3,
    pipeline_device="cpu, float32, 2 torch threads",
    batch_rates={1: 4.0, 2: 4.4, 4: 5.0, 8: 4.8},
    service=[figures(1, 3.0, (1, 1)), figures(4, 4.5, (1, 2))],
    service_batch_size=4,
    sharing=SharingFigures(1, figures(8, 4.2, (2, 2)), figures(8, 3.5, (2, 2))),
    speedups=[speedup("none", 0.5, 5.0), speedup("fused QKV", 0.45, 5.5)],
    machine="2 CPUs, 1-minute load average 0.10 at the start",
)


def test_ratios_against_the_presets_targets() -> None:
    ratios = {ratio.name: ratio for ratio in RESULTS.ratios()}
    assert RESULTS.floor == 5.0
    assert ratios["batched / per-image"].value == pytest.approx(1.25)
    assert ratios["batched / per-image"].verdict == "met"  # small: never slower than the loop
    assert ratios["service c1 / floor"].value == pytest.approx(0.6)
    assert ratios["service c1 / floor"].verdict == ""  # no target
    assert ratios["service c4 / floor"].value == pytest.approx(0.9)
    assert ratios["service c4 / floor"].verdict == "met"
    assert ratios["first image / latency (p50), c4"].value == pytest.approx(0.3)
    shared = ratios["shared / own batches, 1-image requests c8"]
    assert shared.value == pytest.approx(1.2)
    assert shared.verdict == ""
    assert Target(0.5, at_most=True).met_by(0.5)
    assert not Target(0.85).met_by(0.84)


def test_text_report_has_every_measurement_and_ratio() -> None:
    text = to_text(RESULTS)
    assert "raw pipeline, batch 1 (per-image loop, the original design)" in text
    assert "raw pipeline, batch 4 (floor)" in text
    assert "service, concurrency 4 (1 -> 2 worker replicas)" in text
    assert "medians of 3 repeats" in text
    assert "FLUX_SERVE_MAX_BATCH_SIZE is 4" in text
    assert "load average 0.10" in text
    assert "service, 1-image requests, concurrency 8, batches shared (2 worker replicas)" in text
    assert "service, 1-image requests, concurrency 8, own batches (2 worker replicas)" in text
    lines = text.splitlines()
    floor_line = next(line for line in lines if "(floor)" in line)
    assert floor_line.split()[-1] == "5.00"


def test_markdown_report_is_well_formed_tables() -> None:
    table_lines = [line for line in to_markdown(RESULTS).splitlines() if line.startswith("|")]
    assert len(table_lines) == (2 + 4 + 2 + 2) + (2 + 6) + (2 + 2)
    for line in table_lines:
        assert line.endswith("|")
    assert "| service c4 / floor | 0.900 | >= 0.85 | met |" in table_lines
    assert "| fused QKV | 450 ms | 5.50 | 1.100 | 0.250 | 1.00 s |" in table_lines


@pytest.mark.parametrize(
    ("replicas", "note"),
    [
        ((1, 1), "1 worker replica"),
        ((2, 2), "2 worker replicas"),
        ((1, 2), "1 -> 2 worker replicas"),
        ((None, 1), ""),
    ],
    ids=["one", "two", "scaled", "unknown"],
)
def test_replica_note(replicas: tuple[int | None, int | None], note: str) -> None:
    assert replica_note(replicas) == note


def test_speedup_timer_times_the_service_generator_and_compares_pixels(
    settings: ServiceSettings,
) -> None:
    tiny = Workload(prompt="a red cat", images=2, size=64, steps=2)
    timer = SpeedupTimer(settings, tiny, batch_size=2, repeats=1)
    plain = timer.measure({})
    fused = timer.measure({"fuse_qkv": True})
    assert (plain.name, fused.name) == ("none", "fused QKV")
    quantized = timer.measure({"quantize": "int8_weight_only"})
    assert quantized.name == "quantize int8_weight_only"
    assert plain.pixel_difference == 0.0
    assert 0.0 <= fused.pixel_difference <= 1.0
    assert 0.0 < quantized.pixel_difference <= 2.0  # lossy, and the table says how much
    for figures in (plain, fused, quantized):
        assert figures.image_latency_s > 0
        assert figures.images_per_s > 0
        assert figures.warmup_s > 0


def test_timed_job_polls_until_the_job_has_succeeded() -> None:
    answers = iter(
        [
            httpx.Response(202, json={"id": "j1", "status": "queued"}),
            httpx.Response(200, json={"status": "running", "progress": {"done": 0}}),
            httpx.Response(200, json={"status": "running", "progress": {"done": 2}}),
            httpx.Response(
                200,
                json={
                    "status": "succeeded",
                    "progress": {"done": 4},
                    "images": [{}] * 4,
                    # Its end comes from the job itself, not from when the poll saw it.
                    "finished_at": (datetime.now(UTC) + timedelta(seconds=5)).isoformat(),
                },
            ),
        ]
    )
    transport = httpx.MockTransport(lambda _: next(answers))

    async def run() -> jobs_bench.JobTiming:
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            return await jobs_bench.timed_job(client, WORKLOAD.request_body(stream=False), 0.0)

    timing = asyncio.run(run())
    assert timing.images == 4
    assert 0 < timing.first_image_s < 4 < timing.latency_s <= 5


def test_timed_job_fails_loudly_on_a_failed_job() -> None:
    answers = iter(
        [
            httpx.Response(202, json={"id": "j1"}),
            httpx.Response(200, json={"status": "failed", "progress": {"done": 0}, "error": {}}),
        ]
    )
    transport = httpx.MockTransport(lambda _: next(answers))

    async def run() -> None:
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            await jobs_bench.timed_job(client, WORKLOAD.request_body(stream=False), 0.0)

    with pytest.raises(ServiceError, match="failed"):
        asyncio.run(run())


def test_timed_job_gives_up_on_a_job_that_never_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs_bench, "_JOB_DEADLINE_S", 0.05)

    def answer(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(202, json={"id": "j1"})
        return httpx.Response(200, json={"status": "running", "progress": {"done": 4}})

    async def run() -> None:
        transport = httpx.MockTransport(answer)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            await jobs_bench.timed_job(client, WORKLOAD.request_body(stream=False), 0.01)

    with pytest.raises(ServiceError, match="still running after"):
        asyncio.run(run())


def test_serve_config_of_the_jobs_bench_points_at_its_redis_and_can_start_at_zero(
    tmp_path: Path,
) -> None:
    zero = replace(setup(gpus=0), redis_url="redis://127.0.0.1:7001/0", worker_min_replicas=0)
    config = serve_config(zero, 18123, tmp_path)
    application = config["applications"][0]
    assert application["runtime_env"]["env_vars"]["FLUX_SERVE_REDIS_URL"] == zero.redis_url
    (worker,) = [d for d in application["deployments"] if d["name"] == WORKER_DEPLOYMENT]
    autoscaling = worker["autoscaling_config"]
    assert autoscaling["min_replicas"] == autoscaling["initial_replicas"] == 0
    assert autoscaling["policy"]["policy_kwargs"]["broker_url"] == zero.redis_url


def test_jobs_ratio_pairs_the_rounds_and_the_report_has_the_rates_and_cold_start() -> None:
    # A machine that slows down round by round: the pairs' ratios stay near 0.97, while the
    # medians of each side alone would say 0.60.
    rounds = jobs_bench.Rounds(
        generate_rates=[20.0, 10.0, 5.0],
        job_rates=[19.0, 9.7, 4.95],
        first_images=[0.3, 0.5, 0.4],
    )
    figures = jobs_bench.figures_of(4, rounds, 3.25)
    assert figures.ratio == pytest.approx(0.97)
    assert (figures.generate_images_per_s, figures.jobs_images_per_s) == (10.0, 9.7)
    assert figures.first_image_s == pytest.approx(0.4)
    text = jobs_bench.to_text(figures)
    assert "4 at once, medians of 3 rounds" in text
    assert figures.ratio_quartiles == pytest.approx((0.96, 0.98))
    assert (
        "jobs / generate (median of the pairs of rounds): 0.970 "
        "(target >= 0.95: met; quartiles of the pairs 0.960 to 0.980)"
    ) in text
    assert "scale from zero, job submission to first image: 3.25 s" in text


# The LoRA benchmark (bench/loras.py)


def test_lora_switch_timer_times_each_kind_of_batch(settings: ServiceSettings) -> None:
    model = Path(ensure_tiny_model(TINY_FLUX_NAME, settings.cache_dir))
    library, names = ensure_loras(model, settings.cache_dir)
    assert names == [spec.name for spec in TINY_LORAS]
    tiny = Workload(prompt="a red cat", images=2, size=64, steps=1)
    with_library = settings.model_copy(update={"lora_dir": library})
    figures = measure_switches(with_library, tiny, names, batch_size=2, repeats=1)
    assert figures.batch_size == 2
    assert min(figures.same_s, figures.switched_s, figures.loaded_s) > 0


def test_lora_request_bodies_keep_neighbouring_clients_on_other_adapters() -> None:
    names = ["a", "b", "c", "d"]
    body_for = lora_bodies(WORKLOAD, names)
    at_once = [body_for(client, 0)["loras"] for client in range(4)]
    assert sorted(loras[0]["name"] for loras in at_once) == names
    assert body_for(0, 0)["loras"] != body_for(0, 1)["loras"]  # a client goes round them too
    assert body_for(2, 1)["stream"] is True
    assert lora_bodies(WORKLOAD, ["a"])(3, 5)["loras"] == [{"name": "a"}]


def test_lora_report_holds_the_ratios_to_the_issues_targets() -> None:
    results = LoraResults(
        preset="small",
        workload=WORKLOAD,
        repeats=3,
        switches=SwitchFigures(batch_size=4, same_s=0.8, switched_s=0.82, loaded_s=1.0),
        mix=MixFigures(concurrency=4, adapters=4, one_images_per_s=5.0, mix_images_per_s=3.5),
    )
    ratios = {ratio.name: ratio for ratio in results.ratios()}
    assert ratios["adapter switch / batch"].value == pytest.approx(0.025)
    assert ratios["adapter switch / batch"].verdict == "met"
    assert ratios["adapter load / batch"].value == pytest.approx(0.25)
    assert ratios["4-adapter mix / one adapter, c4"].value == pytest.approx(0.7)
    assert ratios["4-adapter mix / one adapter, c4"].verdict == "missed"
    markdown = lora_markdown(results)
    assert "| batch of 4, after a switch between held adapters | 820.0 ms |  |" in markdown
    assert "| service, 4 adapters mixed, concurrency 4 |  | 3.50 |" in markdown
    assert "| 4-adapter mix / one adapter, c4 | 0.700 | >= 0.80 | missed |" in markdown


def test_serve_config_points_the_workers_at_the_benchmarks_adapters(tmp_path: Path) -> None:
    config = serve_config(replace(setup(gpus=0), lora_dir=tmp_path / "loras"), 18123, tmp_path)
    env = config["applications"][0]["runtime_env"]["env_vars"]
    assert env["FLUX_SERVE_LORA_DIR"] == str(tmp_path / "loras")
    assert (
        "FLUX_SERVE_LORA_DIR"
        not in serve_config(setup(gpus=0), 18123, tmp_path)["applications"][0]["runtime_env"][
            "env_vars"
        ]
    )


def test_image_to_image_is_timed_beside_text_to_image_on_the_service_generator(
    generator: FluxGenerator,
) -> None:
    tiny = Workload(prompt="a red cat", images=2, size=64, steps=4)
    jobs, inputs = tiny.image_jobs(generator.settings, input_picture(64), 0.5)
    text_jobs = tiny.jobs(generator.settings)
    assert [job.params.seed for job in jobs] == [job.params.seed for job in text_jobs]
    assert {(job.params.mode, job.params.strength) for job in jobs} == {("image-to-image", 0.5)}
    assert len({job.batch_key() for job in jobs}) == 1
    assert list(inputs.images) == [jobs[0].params.image_digest]
    figures = time_image_inputs(generator, tiny, batch_size=2, repeats=1, strength=0.5)
    assert (figures.strength, figures.steps_run, figures.batch_size) == (0.5, 2, 2)
    assert figures.text_images_per_s > 0
    assert figures.image_images_per_s > 0


def test_the_report_has_image_to_image_against_text_to_image() -> None:
    with_inputs = replace(
        RESULTS,
        image_inputs=ImageInputFigures(
            strength=0.5, steps_run=2, batch_size=4, text_images_per_s=4.0, image_images_per_s=6.0
        ),
    )
    ratios = {ratio.name: ratio for ratio in with_inputs.ratios()}
    faster = ratios["image-to-image / text-to-image, strength 0.5"]
    assert (faster.value, faster.verdict) == (pytest.approx(1.5), "met")
    text = to_text(with_inputs)
    assert "raw pipeline, batch 4, image-to-image at strength 0.5 (2 of 4 steps), in turns" in text
    assert "raw pipeline, batch 4, text-to-image, in turns" in text
    assert "| image-to-image / text-to-image, strength 0.5 | 1.500 | >= 1.00 | met |" in (
        to_markdown(with_inputs)
    )


def test_gpu_run_skips_a_step_that_would_overrun_its_budget_saying_so(tmp_path: Path) -> None:
    results = ResultsFile(tmp_path / "gpu.md", "# header")
    budget = Budget(seconds=100.0)
    assert not skipped(results, budget, "2", 60.0)
    assert skipped(results, budget, "3", 150.0)
    (note,) = results.notes
    assert note.startswith("step 3 skipped: it needs about 150 s, ")
    assert note in (tmp_path / "gpu.md").read_text()


def test_gpu_run_rewrites_its_report_after_every_measurement(tmp_path: Path) -> None:
    report = tmp_path / "out" / "gpu.md"
    results = ResultsFile(report, "# header")
    results.add(PipelineRow("1", "as built, bf16", 1.5, 0.8, 4.0, 0.0))
    assert "| 1 | as built, bf16 | 1.500 s | 0.800 | 1.00 | 4.0 s | 0.000 |" in report.read_text()
    results.add(PipelineRow("2", "compile", 0.9, 1.6, 60.0, 0.25))
    results.add(ServiceRow(16, 3, 1.55, 10.3, 1.2, raw_images_per_s=1.6))
    text = report.read_text()
    assert "| 2 | compile | 0.900 s | 1.600 | 2.00 | 60.0 s | 0.250 |" in text
    assert "| 4 | 3 requests of 16 images | 1.550 | 0.969 | 10.30 s | 1.20 s |" in text
    assert [path.name for path in report.parent.iterdir()] == ["gpu.md"]  # no partial file left


def test_private_redis_answers_inside_the_block_and_is_gone_after_it() -> None:
    import redis

    from bench.cluster import private_redis

    with private_redis() as url:
        assert redis.Redis.from_url(url).ping()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
