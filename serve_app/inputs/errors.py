"""Why an input image is refused: the client's fault (422) or its host's (424)."""

from __future__ import annotations

from serve_app.faults import InvalidParameter


class InputRefused(InvalidParameter):
    """An input that can't be used as sent: ``param`` names the request field."""


class InputFetchFailed(RuntimeError):
    """An allowed image URL that could not be fetched: timed out, unreachable or not a 2xx."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def too_large(param: str, size: int, limit: int) -> InputRefused:
    """The refusal of an input of ``size`` bytes over ``limit``."""
    return InputRefused(
        param, f"the {param} is {size} bytes, over this service's limit of {limit} bytes"
    )
