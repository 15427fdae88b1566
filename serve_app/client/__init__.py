"""The Python client of the REST API (sync and async) and the ``flux-serve`` command.

``from serve_app.client import FluxClient`` is the documented entry point; the client lives in
``flux_client``, server-sent event decoding in ``events``, input files as data: URLs in
``images`` and the command in ``cli``.
"""

from serve_app.client.flux_client import (
    DEFAULT_URL,
    AsyncFluxClient,
    FluxAPIError,
    FluxClient,
    FluxConnectionError,
    FluxError,
    FluxProtocolError,
    FluxTimeoutError,
)
from serve_app.client.images import image_data_url

__all__ = [
    "DEFAULT_URL",
    "AsyncFluxClient",
    "FluxAPIError",
    "FluxClient",
    "FluxConnectionError",
    "FluxError",
    "FluxProtocolError",
    "FluxTimeoutError",
    "image_data_url",
]
