"""The HTTP contract: request and response models of ``POST /generate``.

Compatible with the original service's clients: the same field names and response shape, and an
explicit ``null`` for any optional field means "use the default". Limits come from the settings, so
the OpenAPI schema shows the bounds this deployment enforces.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    StringConstraints,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

from serve_app.generation.samplers import supported_samplers
from serve_app.settings import ImageFormat, get_settings

_limits = get_settings()
MAX_SEED = 2**32 - 1

SeedMode = Literal["fixed", "random", "mix"]


def _supported_sampler(name: str) -> str:
    if name not in supported_samplers():
        raise PydanticCustomError(
            "unsupported_sampler",
            "unsupported sampler '{name}'; supported samplers: {supported}",
            {"name": name, "supported": ", ".join(supported_samplers())},
        )
    return name


# The schema lists the names; the validator refuses others with a message that lists them too.
def _integral_number(value: Any) -> Any:
    # JSON Schema counts 2.0 as an integer; strict validation alone would refuse it.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Bounds come before this validator, which wraps them: that way the JSON schema keeps them.
_INTEGRAL = BeforeValidator(_integral_number)


SamplerName = Annotated[
    str,
    AfterValidator(_supported_sampler),
    WithJsonSchema({"type": "string", "enum": supported_samplers()}),
]
Steps = Annotated[int, Field(ge=1, le=_limits.max_steps), _INTEGRAL]
CfgScale = Annotated[float, Field(ge=1.0, le=_limits.max_cfg_scale)]
ImageSide = Annotated[
    int, Field(ge=_limits.min_size, le=_limits.max_size, multiple_of=16), _INTEGRAL
]
Prompt = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True,
        min_length=1,
        max_length=_limits.max_prompt_chars,
        pattern=r"\S",  # not blank: what stripping and min_length mean, said in the schema
    ),
]
ImageCount = Annotated[int, Field(ge=1, le=_limits.max_images), _INTEGRAL]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED), _INTEGRAL]
ImageQuality = Annotated[int, Field(ge=0, le=100), _INTEGRAL]
# What the pattern admits is read in serve_app/inputs/, which names the field for what it refuses.
InputImageSource = Annotated[
    str, StringConstraints(max_length=_limits.max_data_url_chars, pattern=r"^(data:|https://)")
]
Mode = Literal["text-to-image", "image-to-image", "inpainting"]
Strength = Annotated[float, Field(gt=0.0, le=1.0)]
DEFAULT_STRENGTH = 0.8


# An adapter's name is the stem of a file in the deployment's library: never a path or a URL.
LORA_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
LORA_DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"
MIN_LORA_SCALE = -2.0
MAX_LORA_SCALE = 4.0

_ANNOTATIONS = ("title", "description", "default", "examples")


class _NullMeansDefault(BaseModel):
    """An explicit ``null`` means the default, as the original service's clients send it.

    Strict: JSON's types are kept apart (``false`` is no seed, ``"4"`` no step count).
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            # Unknown keys stay, null or not, for extra="forbid" to refuse them.
            return {
                key: value
                for key, value in data.items()
                if value is not None or key not in cls.model_fields
            }
        return data

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        """Say in the schema what _drop_nulls does: every optional field also takes null."""
        schema = handler.resolve_ref_schema(handler(core_schema))
        required = set(schema.get("required", []))
        for name, field in schema.get("properties", {}).items():
            variants = field.get("anyOf", [])
            if name in required or {"type": "null"} in variants:
                continue
            outer = {key: field.pop(key) for key in _ANNOTATIONS if key in field}
            schema["properties"][name] = {**outer, "anyOf": [field, {"type": "null"}]}
        return schema


class Diversity(_NullMeansDefault):
    """Sampling settings to vary across the images of one request."""

    samplers: list[SamplerName] | None = Field(
        None,
        min_length=1,
        max_length=_limits.max_diversity_values,
        description=f"Samplers to use. Supported: {', '.join(supported_samplers())}. "
        "Unset: the model's own sampler.",
        examples=[["euler", "dpmpp_2m"]],
    )
    nof_steps: list[Steps] | None = Field(
        None,
        min_length=1,
        max_length=_limits.max_diversity_values,
        description="Denoising step counts to use. Unset: the model's own (4 for schnell).",
        examples=[[2, 4]],
    )
    cfg_scales: list[CfgScale] | None = Field(
        None,
        min_length=1,
        max_length=_limits.max_diversity_values,
        description="Guidance scales to use; 1 means no guidance. For a model without guidance "
        "embeddings (schnell) a scale above 1 runs true classifier-free guidance against "
        "negative_prompt, at twice the cost; for a guidance-distilled model (dev) it is the "
        "guidance scale. Unset: the model's own.",
        examples=[[1.0, 3.5]],
    )
    seeds: SeedMode = Field(
        "mix",
        description="'fixed': every image uses base_seed; 'random': a fresh seed per image; "
        "'mix': a seed derived from base_seed and the image's index, different per image and "
        "reproducible.",
        examples=["mix"],
    )


class Lora(_NullMeansDefault):
    """A LoRA adapter of the deployment's library, applied at a scale.

    Every image's sampling_params list the adapters that made it in this same form, digest
    included: sent back, they make the same pixels (or a 422 if the library's file changed).
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: Annotated[str, StringConstraints(pattern=LORA_NAME_PATTERN)] = Field(
        description="An adapter that GET /loras lists.", examples=["tiny-attention"]
    )
    scale: Annotated[float, Field(ge=MIN_LORA_SCALE, le=MAX_LORA_SCALE)] = Field(
        1.0,
        description="How strongly to apply it: 1 as trained, 0 not at all, negative to steer away.",
        examples=[1.0],
    )
    digest: Annotated[str, StringConstraints(pattern=LORA_DIGEST_PATTERN)] | None = Field(
        None,
        description="The content the adapter must have (sha256 of its file, as GET /loras and "
        "sampling_params report it). Unset: whatever the library holds now.",
    )


class GenerateRequest(_NullMeansDefault):
    """A request for images of one prompt."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "prompt": "a red cat on a blue sofa",
                    "nof_images": 4,
                    "diversity": {"samplers": ["euler", "dpmpp_2m"], "nof_steps": [4]},
                    "top_k": 2,
                }
            ]
        },
    )

    prompt: Prompt = Field(description="What to draw.", examples=["a red cat"])
    nof_images: ImageCount = Field(
        min(16, _limits.max_images),
        description="How many images to make.",
        examples=[16],
    )
    gpus: Annotated[int, Field(ge=1, le=_limits.max_gpus_per_request), _INTEGRAL] = Field(
        1,
        description="How many FluxWorker replicas may work on this request at once.",
        examples=[1],
    )
    diversity: Diversity = Field(
        default_factory=Diversity,
        description="What to vary across images. Unset: the model's native settings.",
    )
    stream: bool = Field(
        False,
        description="Answer with server-sent events: one per image as soon as it is stored, then "
        "the full response.",
    )
    image_format: ImageFormat | None = Field(
        None,
        description="Encoding of the stored images: png, jpeg or webp. Unset: the deployment's "
        "(FLUX_SERVE_IMAGE_FORMAT).",
        examples=["webp"],
    )
    image_quality: ImageQuality | None = Field(
        None,
        description="Quality of JPEG and WebP images, 0 (smallest) to 100 (best); PNG is "
        "lossless and ignores it. Unset: the deployment's (FLUX_SERVE_IMAGE_QUALITY).",
        examples=[90],
    )
    top_k: ImageCount | None = Field(
        None,
        description="Return only the K best images by score, best first (at most nof_images). "
        "Unset: every image, in index order.",
        examples=[4],
    )
    width: ImageSide | None = Field(
        None, description="Image width in pixels, a multiple of 16.", examples=[1024]
    )
    height: ImageSide | None = Field(
        None, description="Image height in pixels, a multiple of 16.", examples=[1024]
    )
    image: InputImageSource | None = Field(
        None,
        description="Input image, for image-to-image (or inpainting, with mask): a data: URL "
        "of a base64 PNG, JPEG or WebP, or an https:// URL of a host on the service's allow-list. "
        "Fitted to width x height by resizing it to cover them and cropping the centre; unset "
        "width and height take its size, rounded down to multiples of 16 within the bounds.",
        examples=["data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAA..."],
    )
    mask: InputImageSource | None = Field(
        None,
        description="Inpainting mask, as image takes it and of the same size: white is "
        "repainted, black kept as it is in the input (grey blends the two).",
        examples=["data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAA..."],
    )
    strength: Strength = Field(
        DEFAULT_STRENGTH,
        description="With an image: how much of it is repainted. A run makes the last "
        "steps x strength of its steps (to the nearest, at least one): 1 starts from pure noise "
        "and ignores the input (except for inpainting's kept part).",
        examples=[0.6],
    )
    negative_prompt: str | None = Field(
        None,
        max_length=_limits.max_prompt_chars,
        description="What to steer away from; used where cfg_scale runs true guidance.",
    )
    base_seed: Seed | None = Field(
        None,
        description="Seed of 'fixed' and 'mix' seeding. Unset: 0.",
        examples=[0],
    )
    loras: list[Lora] = Field(
        default_factory=list,
        max_length=_limits.max_loras,
        description=f"LoRA adapters of the deployment's library (GET /loras) to apply together, "
        f"at most {_limits.max_loras}. Unset: the base model.",
        examples=[[{"name": "tiny-attention", "scale": 1.0}]],
    )

    @field_validator("top_k")
    @classmethod
    def _top_k_within_images(cls, top_k: int | None, info: ValidationInfo) -> int | None:
        nof_images = info.data.get("nof_images")
        if top_k is not None and nof_images is not None and top_k > nof_images:
            raise PydanticCustomError(
                "top_k_too_large",
                "top_k ({top_k}) must not exceed nof_images ({nof_images})",
                {"top_k": top_k, "nof_images": nof_images},
            )
        return top_k

    @field_validator("mask", "strength")
    @classmethod
    def _needs_an_image(cls, value: object, info: ValidationInfo) -> object:
        # Runs only on what the client sent; an image that failed validation has its own error.
        if "image" in info.data and info.data["image"] is None:
            raise PydanticCustomError(
                "image_missing",
                "{field} needs an image: {why}",
                {"field": info.field_name, "why": _WHY_AN_IMAGE[str(info.field_name)]},
            )
        return value


_WHY_AN_IMAGE = {
    "mask": "it marks which part of the image to repaint",
    "strength": "it is how much of the image is repainted",
}


class SamplingParams(BaseModel):
    """The exact settings that made one image.

    Sent back with the same prompt (base_seed = seed, seeds 'fixed'), they make the image again:
    bit-identical when it is made the same way (alone, or in a batch of the same jobs), else each
    pixel value within 1 of 255 on the CPU (batches sum their floats in another order).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    sampler: str = Field(description="Sampler name.")
    steps: int = Field(description="Denoising steps.")
    cfg_scale: float = Field(description="Guidance scale (1 = none).")
    seed: int = Field(description="Seed of the image's noise.")
    width: int = Field(description="Width in pixels.")
    height: int = Field(description="Height in pixels.")
    loras: tuple[Lora, ...] = Field(
        (), description="The LoRA adapters applied, each with the digest of its file."
    )
    strength: float | None = Field(
        None, description="How much of the input image was repainted; none for text-to-image."
    )
    image_digest: str | None = Field(
        None,
        description="'sha256:' and the hex SHA-256 of the input image's bytes, as sent or "
        "fetched (the image itself is not echoed); none for text-to-image.",
    )
    mask_digest: str | None = Field(
        None, description="'sha256:' and the hex SHA-256 of the mask's bytes; none without one."
    )

    @property
    def mode(self) -> Mode:
        """What the image was made from: a prompt alone, an input image, or one and a mask."""
        if self.image_digest is None:
            return "text-to-image"
        return "image-to-image" if self.mask_digest is None else "inpainting"


class GeneratedImage(BaseModel):
    """One stored image."""

    url: str = Field(description="Where the image can be fetched.")
    index: int = Field(description="Position of the image's job in the request's plan.")
    sampling_params: SamplingParams
    score: float | None = Field(
        None, description="How well the image matches the prompt (100 x CLIP cosine similarity)."
    )


class GenerateResponse(BaseModel):
    """All images of a request."""

    request_id: str = Field(description="Identifier of the request; part of every image's key.")
    prompt: str
    count: int = Field(description="Number of images returned.")
    images: list[GeneratedImage] = Field(
        description="In index order; with top_k, the K best by score, best first."
    )
    latency_ms: int = Field(description="Time from receiving the request to the answer.")


class LoraInfo(BaseModel):
    """One adapter of the library, as a request can use it."""

    name: str = Field(description="What a request's loras.N.name takes.")
    digest: str = Field(description="sha256 of the file: what sampling_params report.")
    size_bytes: int = Field(description="Size of the file.")
    rank: int = Field(description="Highest LoRA rank among its layers.")
    alpha: float = Field(description="LoRA alpha: the adapter scales its layers by alpha / rank.")
    layers: list[str] = Field(
        description="The kinds of transformer layers it changes, blocks numbered as *.",
        examples=[["transformer_blocks.*.attn.to_q", "transformer_blocks.*.attn.to_k"]],
    )
    modules: int = Field(description="How many transformer layers it changes.")


class RefusedLora(BaseModel):
    """A file of the library that requests can't use, and why."""

    name: str
    reason: str


class LoraListing(BaseModel):
    """The deployment's adapter library."""

    loras: list[LoraInfo] = Field(description="The adapters requests may name, by name.")
    refused: list[RefusedLora] = Field(
        description="Files in the library that are not usable adapters here."
    )
    max_per_request: int = Field(description="Most adapters one request may apply.")


class ErrorBody(BaseModel):
    """What went wrong."""

    type: str = Field(description="Machine-readable kind, e.g. invalid_request.")
    message: str = Field(description="What went wrong, for people.")
    param: str | None = Field(None, description="The request field at fault, dotted.")


class ErrorEnvelope(BaseModel):
    """The body of every error response."""

    error: ErrorBody


class Readiness(BaseModel):
    """Whether the service can take requests, and why not."""

    ready: bool
    detail: str = Field(description="What is still starting or failing, or 'ok'.")
