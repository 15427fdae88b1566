"""Every registered sampler solves FLUX's flow-matching ODE exactly as FluxPipeline drives it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

from serve_app.generation.samplers import (
    SAMPLERS,
    denoising_steps,
    make_scheduler,
    start_part_way,
    supported_samplers,
)

SCHNELL_SCHEDULER = dict(FlowMatchEulerDiscreteScheduler(shift=1.0).config)
IMAGE_SEQ_LEN = 256  # a 256x256 image: (256 / 8 / 2) ** 2 latent patches


def set_flux_timesteps(scheduler: Any, steps: int, *, image_pipeline: bool = False) -> Any:
    """Set the timesteps as FluxPipeline does, or as the image-to-image and inpainting pipelines
    do (they always pass their sigmas)."""
    sigmas = np.linspace(1.0, 1 / steps, steps)
    if getattr(scheduler.config, "use_flow_sigmas", False) and not image_pipeline:
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
    return timesteps


def solve_point_mass_flow(
    scheduler: Any, timesteps: Any, latents: torch.Tensor, x0: torch.Tensor
) -> torch.Tensor:
    """Run ``scheduler`` over ``timesteps`` on a flow whose data is a single point x0.

    For x_t = (1 - sigma) * x0 + sigma * noise, the exact velocity at x is (x - x0) / sigma, so an
    exact flow-matching solver ends on x0 from any start.
    """
    for t in timesteps:
        sigma = max(float(t) / 1000.0, 1e-6)
        velocity = (latents - x0) / sigma
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
    return latents


def point_and_noise() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, IMAGE_SEQ_LEN, 64, generator=generator, dtype=torch.float64)
    return x0, torch.randn(1, IMAGE_SEQ_LEN, 64, generator=generator, dtype=torch.float64)


def sample_point_mass_flow(scheduler: Any, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole schedule from pure noise, as text-to-image runs it. Returns (result, x0)."""
    x0, noise = point_and_noise()
    timesteps = set_flux_timesteps(scheduler, steps)
    return solve_point_mass_flow(scheduler, timesteps, noise, x0), x0


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


@pytest.mark.parametrize("sampler", supported_samplers())
@pytest.mark.parametrize(
    ("steps", "strength"), [(4, 0.5), (4, 0.8), (8, 0.3), (4, 0.05)], ids=lambda v: str(v)
)
def test_image_to_image_starts_at_the_noise_level_it_tells_the_model(
    sampler: str, steps: int, strength: float
) -> None:
    """Part-way, as image-to-image runs it: the noised input is at the noise level of the first
    timestep left, and an exact solver still lands on x0 from there."""
    scheduler = make_scheduler(sampler, SCHNELL_SCHEDULER)
    timesteps = set_flux_timesteps(scheduler, steps, image_pipeline=True)
    left, run = start_part_way(scheduler, strength)
    assert run == denoising_steps(steps, strength)
    assert len(left) == run * scheduler.order - (scheduler.order - 1)
    x0, noise = point_and_noise()
    noised = scheduler.scale_noise(x0, left[:1], noise)
    # On the straight line from x0 to the noise, at the level the first timestep tells the model.
    direction = noise - x0
    level = float(((noised - x0) * direction).sum() / (direction**2).sum())
    assert torch.allclose(noised, x0 + level * direction, atol=1e-6)
    assert level == pytest.approx(float(left[0]) / 1000.0, abs=2e-3)
    assert len(left) < len(timesteps) or run == steps
    result = solve_point_mass_flow(scheduler, left, noised, x0)
    assert torch.allclose(result, x0, atol=1e-2), (result - x0).abs().max()


@pytest.mark.parametrize(
    ("steps", "strength", "run"),
    [
        (4, 1.0, 4),
        (4, 0.8, 3),
        (4, 0.5, 2),
        (4, 0.375, 2),  # halves round up
        (4, 0.3, 1),
        (4, 0.01, 1),  # at least one step
        (1, 0.5, 1),
        (28, 0.7, 20),
        (10, 0.35, 4),  # 3.5 in binary is a hair below; still up
    ],
)
def test_denoising_steps_is_the_nearest_share_of_the_schedule(
    steps: int, strength: float, run: int
) -> None:
    assert denoising_steps(steps, strength) == run
