"""Request and response models of OpenAI's Images API, as the official SDK sends and parses them.

Fields follow the ``openai`` package's types (``ImageGenerateParams``, ``ImageEditParams``,
``ImagesResponse``, ``Model``): what a client built for OpenAI sends arrives here unchanged, as
JSON for generations and as a multipart form for edits; one model holds the fields they share.
Fields that steer OpenAI's own models and mean nothing to FLUX are accepted and ignored, as their
descriptions say; values this service can't honour are a 400 naming the field; unknown fields
are refused. flux-serve's extensions (``seed``, ``sampler``, ``steps``, ``guidance``,
``negative_prompt``; ``strength`` for edits) travel in the same body (the SDK's ``extra_body``).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from serve_app.faults import InvalidParameter
from serve_app.schemas import (
    DEFAULT_STRENGTH,
    CfgScale,
    ImageCount,
    ImageQuality,
    Prompt,
    SamplerName,
    Seed,
    Steps,
    Strength,
)
from serve_app.settings import ImageFormat, get_settings

API_PREFIX = "/v1"
OWNER = "flux-serve"

_settings = get_settings()
_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")
_AUTO_SIZE = f"{_settings.default_width}x{_settings.default_height}"

# Ignored fields take exactly the values the SDK lists: a typo is still a 400, not a silent default.
# The schema says what the validators below allow, where JSON Schema can (model, stream).
Quality = Literal["low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"]
INPAINTING_STRENGTH = 1.0
"""An edit's strength with a mask, unset: OpenAI's mask marks what to draw anew."""


class ImageRequest(BaseModel):
    """The fields that generations and edits share, with their checks.

    An explicit ``null`` means the default, as in OpenAI's API.
    """

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt = Field(description="What to draw.", examples=["a red cat"])
    model: str | None = Field(
        None,
        json_schema_extra={"enum": [_settings.served_model, None]},
        description=f"The served model's id, as GET /v1/models lists it ('{_settings.served_model}'"
        "); any other is a 400. Unset: that model.",
        examples=[_settings.served_model],
    )
    n: ImageCount | None = Field(None, description="How many images to make. Unset: 1.")
    size: str | None = Field(
        None,
        # In the schema only: the validator below refuses other shapes with a clearer message.
        json_schema_extra={"pattern": r"^(auto|[0-9]+x[0-9]+)$"},
        description=f"WIDTHxHEIGHT in pixels, each a multiple of 16 from {_settings.min_size} to "
        f"{_settings.max_size}; 'auto' or unset: {_AUTO_SIZE}.",
        examples=["1024x1024", "auto"],
    )
    response_format: Literal["url", "b64_json"] | None = Field(
        None,
        description="'url': the images are stored and the answer carries their URLs; "
        "'b64_json': the answer carries the images themselves, base64-encoded, and nothing is "
        "stored. Unset: 'url'.",
    )
    output_format: ImageFormat | None = Field(
        None,
        description="Encoding of the images: png, jpeg or webp. Unset: the deployment's "
        "(FLUX_SERVE_IMAGE_FORMAT, png by default).",
    )
    output_compression: ImageQuality | None = Field(
        None,
        description="For jpeg and webp, 0 to 100, as OpenAI's: 100 (the default) keeps the most "
        "detail, lower values make smaller files. Ignored for png, which is lossless. Unset: "
        "the deployment's FLUX_SERVE_IMAGE_QUALITY.",
    )
    quality: Quality | None = Field(
        None,
        description="Accepted and ignored: a FLUX image's quality follows its denoising steps; "
        "set `steps` to change them.",
    )
    background: Literal["opaque", "auto"] | None = Field(
        None, description="FLUX makes opaque images: 'transparent' is a 400."
    )
    complexity: Literal["low", "medium", "high"] | None = Field(
        None, description="Accepted and ignored (planning effort of OpenAI's GPT image models)."
    )
    stream: bool | None = Field(
        None,
        json_schema_extra={"enum": [False, None]},
        description="Only false: POST /generate with stream: true streams images as they are made.",
    )
    safety_identifier: str | None = Field(
        None,
        max_length=256,
        description="A stable id of the end user (hash a name or an email): logged with the "
        "request id, never with the prompt, and never in a metric.",
    )
    user: str | None = Field(
        None,
        max_length=256,
        description="The older name of safety_identifier, used when that is unset or empty.",
    )
    seed: Seed | None = Field(
        None,
        description="flux-serve extension. The same seed and parameters give the same images "
        "(image i's seed is derived from it and i, as /generate's 'mix' seeding). Unset: fresh "
        "random seeds.",
        examples=[7],
    )
    sampler: SamplerName | None = Field(
        None, description="flux-serve extension: the sampler. Unset: the model's own."
    )
    steps: Steps | None = Field(
        None, description="flux-serve extension: denoising steps. Unset: the model's own."
    )
    guidance: CfgScale | None = Field(
        None,
        description="flux-serve extension: the guidance scale, as /generate's cfg_scales (1 = "
        "none; above 1 on schnell, true classifier-free guidance against negative_prompt). "
        "Unset: the model's own.",
    )
    negative_prompt: str | None = Field(
        None,
        max_length=_settings.max_prompt_chars,
        description="flux-serve extension: what guidance steers away from.",
    )

    @field_validator("model")
    @classmethod
    def _served_model(cls, model: str | None) -> str | None:
        if model is not None and model != _settings.served_model:
            raise PydanticCustomError(
                "model_not_found",
                "'{model}' is not served here; the served model is '{served}' (GET /v1/models)",
                {"model": model, "served": _settings.served_model},
            )
        return model

    @field_validator("size")
    @classmethod
    def _size_within_bounds(cls, size: str | None) -> str | None:
        if size is None or size == "auto":
            return size
        match = _SIZE.fullmatch(size)
        sides = [int(side) for side in match.groups()] if match else []
        if not sides or not all(
            _settings.min_size <= side <= _settings.max_size and side % 16 == 0 for side in sides
        ):
            raise PydanticCustomError(
                "unsupported_size",
                "'{size}' is not available: give WIDTHxHEIGHT, each a multiple of 16 from {low} "
                "to {high} (e.g. '{example}'), or 'auto'",
                {
                    "size": size,
                    "low": _settings.min_size,
                    "high": _settings.max_size,
                    "example": _AUTO_SIZE,
                },
            )
        return size

    @field_validator("stream")
    @classmethod
    def _not_streamed(cls, stream: bool | None) -> bool | None:
        if stream:
            raise PydanticCustomError(
                "streaming_not_offered",
                "not offered under /v1; POST /generate with stream: true streams images as "
                "they are made",
            )
        return stream

    def asked_size(self) -> tuple[int, int] | None:
        """Width and height in pixels, as asked; None for 'auto' or unset."""
        if not self.size or self.size == "auto":
            return None
        width, height = self.size.split("x")
        return int(width), int(height)

    def end_user(self) -> str | None:
        """Who the client says the request is for: safety_identifier, else user."""
        return self.safety_identifier or self.user or None


class ImageGenerationRequest(ImageRequest):
    """POST /v1/images/generations, a JSON body: OpenAI's fields and flux-serve's extensions."""

    model_config = ConfigDict(
        strict=True,
        json_schema_extra={
            "examples": [
                {"prompt": "a red cat on a blue sofa", "n": 2, "size": "512x512"},
                {"prompt": "a red cat", "response_format": "b64_json", "seed": 7, "steps": 4},
            ]
        },
    )

    style: Literal["vivid", "natural"] | None = Field(
        None, description="Accepted and ignored (a DALL-E 3 setting): say the style in the prompt."
    )
    moderation: Literal["low", "auto"] | None = Field(
        None, description="Accepted and ignored: this service runs no moderation model."
    )

    def dimensions(self) -> tuple[int, int]:
        """Width and height in pixels ('auto' or unset: the deployment's default size)."""
        width, height = _AUTO_SIZE.split("x")
        return self.asked_size() or (int(width), int(height))


def _unset_by_leaving_out(schema: dict[str, Any]) -> None:
    """A form's schema without null: a form field is unset by leaving it out (the text 'null'
    is no null), where a JSON body may send null."""
    for field in schema.get("properties", {}).values():
        options = [option for option in field.pop("anyOf", []) if option.get("type") != "null"]
        if len(options) == 1:
            field.update(options[0])
        elif options:
            field["anyOf"] = options
        if "enum" in field:
            field["enum"] = [value for value in field["enum"] if value is not None]


class ImageEditRequest(ImageRequest):
    """POST /v1/images/edits, a multipart form: the image to edit, an optional mask, and the
    fields of generations (form fields are text: numbers are read from it)."""

    model_config = ConfigDict(json_schema_extra=_unset_by_leaving_out)

    # The image's and mask's descriptions say what the service takes; the files' limits and
    # checks are those of /generate's inputs (serve_app/inputs/).
    image: list[UploadFile] = Field(
        default_factory=list,
        description="The image to edit: one PNG, JPEG or WebP file. Without a mask it is "
        "repainted as a whole (image-to-image), with one only where the mask is transparent "
        "(inpainting). Fitted to `size` by resizing it to cover the size and cropping the "
        "centre. A second file is a 400.",
    )
    image_array: list[UploadFile] = Field(
        default_factory=list,
        alias="image[]",
        description="The array form of `image` (GPT image models take several): accepted with "
        "exactly one file, for clients that always send an array.",
    )
    mask: UploadFile | None = Field(
        None,
        description="Where to edit, in OpenAI's convention: an image of the same size as "
        "`image` (a PNG, or a WebP, with an alpha channel) whose fully transparent pixels "
        "(alpha 0) are repainted and whose opaque ones are kept; partly transparent ones blend. "
        "Its colours are ignored. Unset: the whole image is repainted.",
    )
    strength: Strength | None = Field(
        None,
        description="flux-serve extension: how much of the image is repainted, in (0, 1], as "
        "/generate's strength (a run makes the last steps x strength of its steps). Unset: "
        f"{DEFAULT_STRENGTH} without a mask, {INPAINTING_STRENGTH} with one (the masked part is "
        "drawn anew, as at OpenAI).",
        examples=[0.6],
    )
    input_fidelity: Literal["high", "low"] | None = Field(
        None,
        description="Accepted and ignored (a GPT image model setting): lower `strength` to keep "
        "more of the input.",
    )

    def upload(self) -> UploadFile:
        """The one image to edit; InvalidParameter naming `image` unless exactly one was sent."""
        files = [*self.image, *self.image_array]
        if not files:
            raise InvalidParameter("image", "send the image to edit as a file in the field image")
        if len(files) > 1:
            raise InvalidParameter(
                "image",
                f"{len(files)} images were sent; an edit here takes exactly one image file",
            )
        return files[0]

    def effective_strength(self) -> float:
        """The strength asked for, else the default of the edit's mode."""
        if self.strength is not None:
            return self.strength
        return DEFAULT_STRENGTH if self.mask is None else INPAINTING_STRENGTH


class ImageData(BaseModel):
    """One image: its URL, or the image itself (the SDK's ``Image``)."""

    url: str | None = Field(
        None, description="Where the image can be fetched (response_format url)."
    )
    b64_json: str | None = Field(
        None, description="The encoded image, base64 (response_format b64_json)."
    )


class ImagesResponse(BaseModel):
    """The answer of POST /v1/images/generations and /v1/images/edits (the SDK's
    ``ImagesResponse``).

    No ``usage``: it counts tokens of OpenAI's image models, which a FLUX pipeline has no
    equivalent of.
    """

    created: int = Field(description="When the images were made, in Unix seconds.")
    data: list[ImageData] = Field(description="The images, in order.")
    background: Literal["opaque"] = Field("opaque", description="Always opaque.")
    output_format: ImageFormat = Field(description="Encoding of the images.")
    size: str = Field(description="WIDTHxHEIGHT of the images.", examples=["1024x1024"])


class ModelCard(BaseModel):
    """A served model (the SDK's ``Model``)."""

    id: str = Field(description="What requests name as `model`.")
    object: Literal["model"] = "model"
    created: int = Field(description="When this service started serving it, in Unix seconds.")
    owned_by: str = Field(OWNER, description="Who serves it.")


class ModelList(BaseModel):
    """The answer of GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorBody(BaseModel):
    """What went wrong, in OpenAI's terms."""

    message: str = Field(description="What went wrong, for people.")
    type: str = Field(description="'invalid_request_error' for 4xx, 'server_error' for 5xx.")
    param: str | None = Field(None, description="The request field at fault, dotted.")
    code: str | None = Field(
        None,
        description="The precise kind: e.g. overloaded, storage_error, authentication_error; for "
        "an invalid request the check that failed (missing, extra_forbidden, model_not_found, "
        "unsupported_size, ...).",
    )


class OpenAIErrorEnvelope(BaseModel):
    """The body of every error response under /v1."""

    error: OpenAIErrorBody
