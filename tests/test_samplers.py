"""Every registered sampler solves FLUX's flow-matching ODE exactly as FluxPipeline drives it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

from serve_app.generation.samplers import SAMPLERS, make_scheduler, supported_samplers

SCHNELL_SCHEDULER = dict(FlowMatchEulerDiscreteScheduler(shift=1.0).config)
IMAGE_SEQ_LEN = 256  # a 256x256 image: (256 / 8 / 2) ** 2 latent patches


def sample_point_mass_flow(scheduler: Any, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``scheduler`` the way FluxPipeline does on a flow whose data is a single point x0.

    For x_t = (1 - sigma) * x0 + sigma * noise, the exact velocity at x is (x - x0) / sigma, so an
    exact flow-matching solver ends on x0 from any start. Returns (result, x0).
    """
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, IMAGE_SEQ_LEN, 64, generator=generator, dtype=torch.float64)
    latents = torch.randn(1, IMAGE_SEQ_LEN, 64, generator=generator, dtype=torch.float64)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    if getattr(scheduler.config, "use_flow_sigmas", False):
        sigmas = None
    config = scheduler.config
    mu = calculate_shift(
        IMAGE_SEQ_LEN,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    timesteps, _ = retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
    for t in timesteps:
        sigma = max(float(t) / 1000.0, 1e-6)
        velocity = (latents - x0) / sigma
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
    return latents, x0


@pytest.mark.parametrize("sampler", supported_samplers())
@pytest.mark.parametrize("steps", [1, 4, 8], ids=lambda s: f"{s}steps")
def test_registered_sampler_lands_on_the_exact_solution(sampler: str, steps: int) -> None:
    scheduler = make_scheduler(sampler, SCHNELL_SCHEDULER)
    result, x0 = sample_point_mass_flow(scheduler, steps)
    # Flow-sigma solvers stop at sigma = 1/1000 rather than 0, hence the tolerance.
    assert torch.allclose(result, x0, atol=1e-2), (result - x0).abs().max()


def test_the_oracle_catches_a_sampler_that_is_wrong_for_flow_matching() -> None:
    from diffusers import DEISMultistepScheduler

    wrong = DEISMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", use_dynamic_shifting=True
    )
    result, x0 = sample_point_mass_flow(wrong, 4)
    assert not torch.allclose(result, x0, atol=1e-2)


@pytest.mark.parametrize("sampler", supported_samplers())
def test_each_sampler_builds_a_distinct_configuration(sampler: str) -> None:
    import diffusers

    scheduler = make_scheduler(sampler, SCHNELL_SCHEDULER)
    assert isinstance(scheduler, getattr(diffusers, SAMPLERS[sampler].scheduler))
    for key, value in SAMPLERS[sampler].overrides.items():
        assert scheduler.config[key] == value
