"""Native sampling settings of the FLUX variants we serve, as named tables."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ModelProfile(BaseModel):
    """What a model does when the request leaves diversity out: its own recommended sampling."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sampler: str = Field(description="Sampler the model was distilled or tuned for.")
    steps: int = Field(ge=1, description="Recommended number of denoising steps.")
    cfg_scale: float = Field(ge=1.0, description="Recommended guidance scale (1 = none).")
    max_sequence_length: int = Field(ge=1, le=512, description="T5 prompt tokens the model takes.")
    guidance_distilled: bool = Field(
        description="The guidance scale is an input of the model; without one, a scale above 1 "
        "runs true classifier-free guidance at twice the transformer calls."
    )


PROFILES: dict[str, ModelProfile] = {
    # Timestep-distilled: 4 steps, no guidance input; max_sequence_length 256 as in its model card.
    "schnell": ModelProfile(
        sampler="euler", steps=4, cfg_scale=1.0, max_sequence_length=256, guidance_distilled=False
    ),
    # Guidance-distilled: cfg_scale feeds the guidance embedding.
    "dev": ModelProfile(
        sampler="euler", steps=28, cfg_scale=3.5, max_sequence_length=512, guidance_distilled=True
    ),
}
