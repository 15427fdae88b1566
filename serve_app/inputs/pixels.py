"""Fitted input pixels, as a render call carries them to the workers: once per call, by digest."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from serve_app.schemas import SamplingParams


class FittedImage(BaseModel):
    """An input image or mask at the output size, as raw 8-bit pixels."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    digest: str = Field(description="Digest of the bytes it was decoded from.")
    width: int
    height: int
    mode: Literal["RGB", "L"] = Field(description="RGB for an image, L (grey) for a mask.")
    pixels: bytes = Field(description="width x height pixels, row by row.")

    @classmethod
    def of(cls, image: Image.Image, digest: str) -> FittedImage:
        """The pixels of a fitted PIL image in mode RGB or L."""
        mode = "RGB" if image.mode == "RGB" else "L"
        return cls(
            digest=digest,
            width=image.width,
            height=image.height,
            mode=mode,
            pixels=image.convert(mode).tobytes(),
        )

    def to_pil(self) -> Image.Image:
        """The pixels as a PIL image."""
        return Image.frombytes(self.mode, (self.width, self.height), self.pixels)


class RenderInputs(BaseModel):
    """The input images and masks of a render call's jobs, by digest; empty for text-to-image.

    Jobs name their inputs in their sampling parameters, so a call of many jobs carries each
    input once. Images and masks are kept apart: one file may be sent as both.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    images: dict[str, FittedImage] = Field(default_factory=dict)
    masks: dict[str, FittedImage] = Field(default_factory=dict)

    @classmethod
    def merged(cls, parts: Iterable[RenderInputs]) -> RenderInputs:
        """The inputs of several calls together (equal digests at equal sizes are equal pixels)."""
        images: dict[str, FittedImage] = {}
        masks: dict[str, FittedImage] = {}
        for part in parts:
            images.update(part.images)
            masks.update(part.masks)
        return cls(images=images, masks=masks)

    def image_for(self, params: SamplingParams) -> FittedImage:
        """The input image of a job; KeyError when the call did not carry it."""
        return self._sized(self.images, params.image_digest, params)

    def mask_for(self, params: SamplingParams) -> FittedImage:
        """The mask of an inpainting job; KeyError when the call did not carry it."""
        return self._sized(self.masks, params.mask_digest, params)

    @staticmethod
    def _sized(
        found: dict[str, FittedImage], digest: str | None, params: SamplingParams
    ) -> FittedImage:
        if digest is None:
            raise KeyError(f"a {params.mode} job names no such input")
        fitted = found[digest]
        if (fitted.width, fitted.height) != (params.width, params.height):
            raise ValueError(
                f"input {digest} is {fitted.width}x{fitted.height}, the job "
                f"{params.width}x{params.height}"
            )
        return fitted
