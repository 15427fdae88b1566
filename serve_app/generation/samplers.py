"""The named samplers that work with FLUX's flow matching, and how to build each one.

Only schedulers that solve the flow-matching ODE are listed; the tests check each against the exact
solution of a flow. The names are what a request's ``diversity.samplers`` takes. diffusers is
imported only when a scheduler is built, so validating a name costs nothing.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from functools import cache
from typing import Any


@dataclass(frozen=True)
class SamplerSpec:
    """A diffusers scheduler class and the settings that make it a flow-matching sampler."""

    scheduler: str
    description: str
    overrides: dict[str, Any] = field(default_factory=dict)
    order: int = 1
    """Model calls per step; a second-order step reuses the call that ends the step before."""

    def model_calls(self, steps: int) -> int:
        """Transformer calls this sampler makes for ``steps`` denoising steps."""
        return self.order * steps - (self.order - 1)


# DPM-Solver and UniPC default to noise prediction on a DDPM schedule; the flow settings switch them
# to velocity prediction on flow sigmas. FluxPipeline always passes `mu`, hence dynamic shifting.
_FLOW_SOLVER = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}

SAMPLERS: dict[str, SamplerSpec] = {
    "euler": SamplerSpec(
        "FlowMatchEulerDiscreteScheduler", "First-order Euler; FLUX.1-schnell's own sampler."
    ),
    "euler_karras": SamplerSpec(
        "FlowMatchEulerDiscreteScheduler", "Euler on Karras sigmas.", {"use_karras_sigmas": True}
    ),
    "heun": SamplerSpec(
        "FlowMatchHeunDiscreteScheduler", "Second-order Heun: two model calls per step.", order=2
    ),
    "dpmpp_2m": SamplerSpec(
        "DPMSolverMultistepScheduler",
        "DPM-Solver++(2M), multistep second order.",
        {**_FLOW_SOLVER, "use_dynamic_shifting": True, "algorithm_type": "dpmsolver++"},
    ),
    "dpmpp_2s": SamplerSpec(
        "DPMSolverSinglestepScheduler",
        "DPM-Solver++(2S), singlestep second order.",
        {**_FLOW_SOLVER, "use_dynamic_shifting": True, "algorithm_type": "dpmsolver++"},
    ),
    "unipc": SamplerSpec("UniPCMultistepScheduler", "UniPC multistep.", _FLOW_SOLVER),
    "lcm": SamplerSpec("FlowMatchLCMScheduler", "Latent-consistency sampling on the flow."),
}


def supported_samplers() -> list[str]:
    """Names a request may use, in a stable order."""
    return sorted(SAMPLERS)


# Schedulers that make their own sigmas. FluxPipeline leaves its sigmas out for the flow-sigma
# solvers, but the image-to-image and inpainting pipelines always pass them.
_OWN_SIGMAS = {
    "FlowMatchHeunDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
}
# Schedulers that add noise at each step. FluxPipeline passes no generator to their ``step``,
# which then draws from torch's global random state: no image could be made again from its seed.
_NOISE_AS_THEY_GO = {"FlowMatchLCMScheduler"}


@cache
def _scheduler_class(name: str) -> type:
    import diffusers

    base: type = getattr(diffusers, name)
    own_sigmas = name in _OWN_SIGMAS
    noises_like_flow_match = hasattr(base, "scale_noise")
    noise_as_it_goes = name in _NOISE_AS_THEY_GO
    if not own_sigmas and noises_like_flow_match and not noise_as_it_goes:
        return base
    parameters = inspect.signature(base.set_timesteps).parameters  # type: ignore[attr-defined]
    takes_mu = "mu" in parameters

    class ForFlux(base):  # type: ignore[misc]
        """The scheduler as every FLUX pipeline drives it: its set_timesteps takes the pipeline's
        `sigmas` and `mu` (keeping its own sigmas where it makes them), and it noises an input
        image with FlowMatch's `scale_noise`, which image-to-image and inpainting call. One
        that adds noise as it goes draws it from each image's own generator."""

        generators: list[Any] | None = None

        if own_sigmas:

            def set_timesteps(
                self,
                num_inference_steps: int | None = None,
                device: Any = None,
                sigmas: Any = None,
                mu: Any = None,
            ) -> None:
                # The pipelines pass the step count only through their sigmas.
                steps = num_inference_steps if num_inference_steps is not None else len(sigmas)
                super().set_timesteps(steps, device=device, **({"mu": mu} if takes_mu else {}))

        if not noises_like_flow_match:

            def scale_noise(self, sample: Any, timestep: Any, noise: Any) -> Any:
                # On flow sigmas add_noise is the same forward process: (1 - s) x + s noise.
                return self.add_noise(sample, noise, timestep)

        if noise_as_it_goes:

            def step(
                self,
                model_output: Any,
                timestep: Any,
                sample: Any,
                generator: Any = None,
                return_dict: bool = True,
            ) -> Any:
                own = self.generators if generator is None else generator
                return super().step(model_output, timestep, sample, own, return_dict)

    ForFlux.__name__ = ForFlux.__qualname__ = f"{base.__name__}ForFlux"
    return ForFlux


def make_scheduler(
    sampler: str, base_config: dict[str, Any], generators: list[Any] | None = None
) -> Any:
    """A fresh scheduler for ``sampler`` from the model's own scheduler configuration.

    ``generators`` (one per image of the batch, those that drew its initial noise) feed the
    samplers that add noise as they go, so that each image depends on its own seed alone.
    """
    spec = SAMPLERS[sampler]
    cls = _scheduler_class(spec.scheduler)
    # Keep only what this class takes: diffusers' bookkeeping keys (such as _use_default_values)
    # would otherwise make it drop our overrides, and foreign keys only produce warnings.
    accepted = cls._get_init_keys(cls)  # type: ignore[attr-defined]
    config = {key: value for key, value in base_config.items() if key in accepted}
    scheduler = cls(**{**config, **spec.overrides})
    if hasattr(scheduler, "generators"):
        scheduler.generators = generators
    return scheduler


def denoising_steps(steps: int, strength: float) -> int:
    """How many of a ``steps``-step schedule an image-to-image or inpainting run makes: the last
    ``steps x strength`` of them, to the nearest step (halves up), and at least one.

    So the run starts at the step whose noise level is nearest to ``strength``; diffusers' own
    rule rounds up instead, which at schnell's 4 steps makes any strength above 0.75 start from
    pure noise and ignore the input.
    """
    return max(1, math.floor(steps * strength + 0.5 + 1e-9))


def start_part_way(scheduler: Any, strength: float) -> tuple[Any, int]:
    """Begin a scheduler, its timesteps set, part-way for ``strength``, as image-to-image and
    inpainting do: the timesteps left to run, and how many steps of the schedule they make."""
    order = int(scheduler.order)
    # Second-order Heun has 2n - 1 timesteps for n steps, two per step but the last.
    steps = (len(scheduler.timesteps) + order - 1) // order
    run = denoising_steps(steps, strength)
    begin = (steps - run) * order
    scheduler.set_begin_index(begin)
    return scheduler.timesteps[begin:], run
