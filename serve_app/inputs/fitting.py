"""Fitting an input to the output size: resize to cover it, then crop the centre.

Unset width and height take the input's own size, scaled into the size bounds (its aspect
kept where the bounds allow) and rounded down to multiples of 16; with one of them set, the
other follows the input's aspect. Transparent parts of an image count as white, of a mask as
black (kept).
"""

from __future__ import annotations

from fractions import Fraction

from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict

from serve_app.inputs.decoding import DecodedImage
from serve_app.inputs.errors import InputRefused
from serve_app.inputs.pixels import FittedImage, RenderInputs
from serve_app.settings import ServiceSettings

_SIDE_MULTIPLE = 16


class RequestInputs(BaseModel):
    """A request's input image, its mask for inpainting and the strength, fitted once."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image: FittedImage
    mask: FittedImage | None
    strength: float

    @property
    def size(self) -> tuple[int, int]:
        """Width and height of the images to make."""
        return self.image.width, self.image.height

    def sampling_fields(self) -> dict[str, object]:
        """What every image of the request records of its inputs in its sampling parameters."""
        return {
            "strength": self.strength,
            "image_digest": self.image.digest,
            "mask_digest": self.mask.digest if self.mask else None,
        }

    def render_inputs(self) -> RenderInputs:
        """The pixels a render call of this request's jobs carries."""
        masks = {self.mask.digest: self.mask} if self.mask else {}
        return RenderInputs(images={self.image.digest: self.image}, masks=masks)


def output_size(
    input_size: tuple[int, int], width: int | None, height: int | None, settings: ServiceSettings
) -> tuple[int, int]:
    """The size to make images of an input of ``input_size``, for the request's width and height."""
    if width is not None and height is not None:
        return width, height
    input_width, input_height = input_size
    if width is not None:
        return width, _side(Fraction(width * input_height, input_width), settings)
    if height is not None:
        return _side(Fraction(height * input_width, input_height), settings), height
    scale = min(Fraction(1), Fraction(settings.max_size, max(input_size)))
    if min(input_size) * scale < settings.min_size:
        scale = Fraction(settings.min_size, min(input_size))
    return _side(input_width * scale, settings), _side(input_height * scale, settings)


def _side(length: Fraction, settings: ServiceSettings) -> int:
    rounded = int(length) // _SIDE_MULTIPLE * _SIDE_MULTIPLE
    return min(max(rounded, settings.min_size), settings.max_size)


def fit(image: Image.Image, size: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    """``image`` resized to cover ``size`` and cropped to it around its centre."""
    return ImageOps.fit(image, size, method=resample, centering=(0.5, 0.5))


def _flattened(image: Image.Image, mode: str, background: str) -> Image.Image:
    """``image`` in ``mode``, its transparent parts over ``background``."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        over = Image.new("RGBA", image.size, background)
        image = Image.alpha_composite(over, image.convert("RGBA"))
    return image.convert(mode)


def fit_inputs(
    image: DecodedImage,
    mask: DecodedImage | None,
    width: int | None,
    height: int | None,
    strength: float,
    settings: ServiceSettings,
) -> RequestInputs:
    """A request's decoded image and mask, checked against each other and fitted to its size."""
    if mask is not None and mask.image.size != image.image.size:
        raise InputRefused(
            "mask",
            f"the mask is {mask.image.width}x{mask.image.height} and the image "
            f"{image.image.width}x{image.image.height}: they must be the same size",
        )
    size = output_size(image.image.size, width, height, settings)
    fitted = fit(_flattened(image.image, "RGB", "white"), size, Image.Resampling.LANCZOS)
    fitted_mask = None
    if mask is not None:
        # Bilinear: a mask's edges stay soft without the ringing of Lanczos.
        grey = fit(_flattened(mask.image, "L", "black"), size, Image.Resampling.BILINEAR)
        fitted_mask = FittedImage.of(grey, mask.digest)
    return RequestInputs(
        image=FittedImage.of(fitted, image.digest), mask=fitted_mask, strength=strength
    )
