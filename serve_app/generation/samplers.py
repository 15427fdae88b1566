"""The named samplers that work with FLUX's flow matching, and how to build each one.

Only schedulers that solve the flow-matching ODE are listed; the tests check each against the exact
solution of a flow. The names are what a request's ``diversity.samplers`` takes. diffusers is
imported only when a scheduler is built, so validating a name costs nothing.
"""

from __future__ import annotations

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


@cache
def _scheduler_class(name: str) -> type:
    import diffusers

    base: type = getattr(diffusers, name)
    if name != "FlowMatchHeunDiscreteScheduler":
        return base

    class FlowMatchHeunForFlux(base):  # type: ignore[misc]
        """Heun whose set_timesteps takes FluxPipeline's `sigmas` and `mu` and keeps its own."""

        def set_timesteps(
            self,
            num_inference_steps: int | None = None,
            device: Any = None,
            sigmas: Any = None,
            mu: Any = None,  # noqa: ARG002 - FluxPipeline passes it; Heun keeps its own shift
        ) -> None:
            # FluxPipeline passes the step count only through its sigmas.
            steps = num_inference_steps if num_inference_steps is not None else len(sigmas)
            super().set_timesteps(steps, device=device)

    return FlowMatchHeunForFlux


def make_scheduler(sampler: str, base_config: dict[str, Any]) -> Any:
    """A fresh scheduler for ``sampler`` from the model's own scheduler configuration."""
    spec = SAMPLERS[sampler]
    cls = _scheduler_class(spec.scheduler)
    # Keep only what this class takes: diffusers' bookkeeping keys (such as _use_default_values)
    # would otherwise make it drop our overrides, and foreign keys only produce warnings.
    accepted = cls._get_init_keys(cls)  # type: ignore[attr-defined]
    config = {key: value for key, value in base_config.items() if key in accepted}
    return cls(**{**config, **spec.overrides})
