"""Runs sampling jobs on a FLUX pipeline: one loading path for real weights and the tiny model."""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from serve_app.generation.adapter_runtime import AdapterRuntime, adapter_runtime
from serve_app.generation.modes import ModePipelines, input_arguments, keep_unmasked
from serve_app.generation.planning import SamplingJob
from serve_app.generation.prompts import PromptEncoder
from serve_app.generation.quantization import quantize_transformer, quiet_torchao_import
from serve_app.generation.samplers import make_scheduler
from serve_app.generation.speedups import apply_speedups, compile_pipeline
from serve_app.generation.threads import apply_torch_threads
from serve_app.inputs.pixels import RenderInputs
from serve_app.models.image_processors import use_pil_image_processors
from serve_app.models.sources import (
    quiet_progress_bars,
    resolve_source,
    select_device,
    select_dtype,
)
from serve_app.models.tiny import TINY_FLUX_NAME
from serve_app.schemas import Mode, SamplingParams
from serve_app.settings import ServiceSettings
from serve_app.storage import codec
from serve_app.telemetry import Telemetry

logger = logging.getLogger(__name__)


class RenderCancelled(RuntimeError):
    """A batch was stopped before its end because nobody waits for it any more."""


class RenderedImage(BaseModel):
    """A finished image of one job, encoded for storage."""

    model_config = ConfigDict(frozen=True)

    job: SamplingJob
    data: bytes
    compute_s: float = Field(0.0, ge=0, description="Its share of its batch's pipeline seconds.")
    worker: str = Field("", description="The worker that made it.")


class FluxGenerator:
    """A loaded FLUX pipeline that turns batches of sampling jobs into images."""

    def __init__(
        self,
        settings: ServiceSettings,
        pipeline: Any | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        """Load ``settings.model``, or take ``pipeline``, a FluxPipeline already on the device
        in its dtype (the GPU benchmark builds one with random weights in place); ``telemetry``
        hears of the adapter cache."""
        quiet_torchao_import()
        use_pil_image_processors()
        from diffusers import FluxPipeline

        quiet_progress_bars()
        self.settings = settings
        self.device = select_device(settings)
        self.dtype = select_dtype(settings, self.device)
        apply_torch_threads(settings, self.device)
        if pipeline is None:
            source = resolve_source(settings.model, TINY_FLUX_NAME, settings.cache_dir)
            logger.info(
                "loading FLUX pipeline from %s on %s as %s", source, self.device, self.dtype
            )
            pipeline = FluxPipeline.from_pretrained(source, dtype=self.dtype).to(self.device)
        self.pipeline = pipeline
        self.pipeline.set_progress_bar_config(disable=True)
        self._scheduler_config = dict(self.pipeline.scheduler.config)
        # Guidance-distilled models (dev) take the scale as an input; schnell needs true CFG.
        self.guidance_distilled = bool(self.pipeline.transformer.config.guidance_embeds)
        apply_speedups(self.pipeline, settings)
        quantize_transformer(self.pipeline, settings, self.device)
        # After quantizing, so that adapters keep their own precision; before compiling, as
        # with compile_mode the adapter slots are part of the compiled graph.
        self.adapters: AdapterRuntime | None = adapter_runtime(self.pipeline, settings, telemetry)
        compile_pipeline(self.pipeline, settings)
        self.prompts = PromptEncoder(self.pipeline, settings.prompt_cache_size)
        # After the speed-ups, which change the shared components in place.
        self.modes = ModePipelines(self.pipeline)
        # One pipeline, one scheduler slot: calls from several threads must take turns.
        self._lock = threading.Lock()
        if settings.warmup:
            self.warm_up()

    def _one_step_jobs(self, count: int, width: int, height: int) -> list[SamplingJob]:
        params = SamplingParams(
            sampler=self.settings.native.sampler,
            steps=1,
            cfg_scale=1.0,
            seed=0,
            width=width,
            height=height,
        )
        return [
            SamplingJob(index=index, prompt="warm-up", negative_prompt=None, params=params)
            for index in range(count)
        ]

    def _smallest_job(self) -> SamplingJob:
        side = self.settings.min_size
        return self._one_step_jobs(1, side, side)[0]

    def warm_up(self) -> None:
        """One small generation, so that the first request does not pay for lazy initialization.

        A compiled pipeline also makes one image and one full batch of the default size: the
        shapes most requests take are then compiled before the replica reports ready.
        """
        self.render([self._smallest_job()])
        if self.settings.compile_mode != "off":
            width, height = self.settings.default_width, self.settings.default_height
            for count in sorted({1, self.settings.max_batch_size}):
                self.render(self._one_step_jobs(count, width, height))

    def check(self) -> None:
        """Raise RuntimeError unless the model still produces finite latents on its device.

        A busy pipeline is working, so the check passes without waiting for it.
        """
        if not self._lock.acquire(blocking=False):
            return
        try:
            arguments = self.pipeline_arguments([self._smallest_job()])
            arguments["output_type"] = "latent"
            latents = self._run(self.settings.native.sampler, arguments, cancelled=None)
        finally:
            self._lock.release()
        if not torch.isfinite(latents).all():
            raise RuntimeError(f"the FLUX pipeline on {self.device} produces non-finite values")

    def pipeline_arguments(
        self, batch: list[SamplingJob], inputs: RenderInputs | None = None
    ) -> dict[str, Any]:
        """The pipeline call that makes exactly the images ``batch`` names, from ``inputs``;
        the caller holds the lock (it runs the text encoders for prompts not encoded recently)."""
        first = batch[0]
        params = first.params
        true_cfg = not self.guidance_distilled and params.cfg_scale > 1.0
        arguments: dict[str, Any] = {
            **self.prompts.arguments(
                [job.prompt for job in batch],
                [job.negative_prompt or "" for job in batch] if true_cfg else None,
                self.settings.native.max_sequence_length,
            ),
            "num_inference_steps": params.steps,
            "width": params.width,
            "height": params.height,
            # CPU generators give the same noise on every device, so a seed means the same image.
            "generator": [torch.Generator("cpu").manual_seed(job.params.seed) for job in batch],
            "output_type": "pil",
        }
        if self.guidance_distilled:
            arguments["guidance_scale"] = params.cfg_scale
        elif true_cfg:
            arguments["true_cfg_scale"] = params.cfg_scale
        arguments.update(input_arguments(batch, inputs or RenderInputs()))
        return arguments

    def _run(
        self,
        sampler: str,
        arguments: dict[str, Any],
        cancelled: threading.Event | None,
        mode: Mode = "text-to-image",
    ) -> Any:
        """One pipeline call; the caller holds the lock. Stops at the next denoising step once
        ``cancelled`` is set (the images are then never used)."""

        def stop_when_cancelled(
            pipeline: Any, _step: int, _timestep: Any, tensors: dict[str, Any]
        ) -> dict[str, Any]:
            if cancelled is not None and cancelled.is_set():
                pipeline._interrupt = True  # diffusers' documented way to end the loop early
            return tensors

        pipeline = self.modes[mode]
        with torch.inference_mode():
            pipeline.scheduler = make_scheduler(
                sampler, self._scheduler_config, arguments["generator"]
            )
            return pipeline(**arguments, callback_on_step_end=stop_when_cancelled).images

    def sample(
        self,
        batch: list[SamplingJob],
        cancelled: threading.Event | None = None,
        inputs: RenderInputs | None = None,
    ) -> list[Any]:
        """The images of jobs that share a batch key, from one pipeline call, not yet encoded;
        ``inputs`` has the input images (and masks) the jobs name.

        Raises RenderCancelled when ``cancelled`` was set before the call ended.
        """
        keys = {job.batch_key() for job in batch}
        if len(keys) != 1:
            raise ValueError(f"a batch must share one batch key, got {len(keys)}")
        inputs = inputs or RenderInputs()
        params = batch[0].params
        with self._lock:
            if self.adapters is not None:
                self.adapters.activate(params.loras)
            arguments = self.pipeline_arguments(batch, inputs)
            images: list[Any] = self._run(params.sampler, arguments, cancelled, params.mode)
        if cancelled is not None and cancelled.is_set():
            raise RenderCancelled(f"cancelled batch of {len(batch)} images")
        return keep_unmasked(batch, images, inputs)

    def encode(self, batch: list[SamplingJob], images: list[Any]) -> list[RenderedImage]:
        """The sampled ``images`` of ``batch``, encoded for storage; needs no pipeline."""
        return [
            RenderedImage(
                job=job,
                data=codec.encode(image, job.image_format, job.image_quality),
            )
            for job, image in zip(batch, images, strict=True)
        ]

    def render(
        self,
        batch: list[SamplingJob],
        cancelled: threading.Event | None = None,
        inputs: RenderInputs | None = None,
    ) -> list[RenderedImage]:
        """Make and encode the images of jobs that share a batch key, in one pipeline call."""
        return self.encode(batch, self.sample(batch, cancelled, inputs))
