"""Fetching an image URL on a client's behalf: allow-listed https hosts, bounded in time and size.

Only hosts on ``image_url_hosts`` are called, and only where they resolve to public addresses
(serve_app/api/outbound.py) unless ``image_url_private_hosts`` lets them be internal. Redirects
are not followed (one could lead anywhere); proxies and certificates come from the settings, not
from the process environment, except OpenSSL's own SSL_CERT_FILE. The host's name is resolved
twice, once to check it and once to connect: the allow-list, not the check, is what stops a host
whose records change in between.
"""

from __future__ import annotations

import asyncio
import ssl
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from serve_app.api.outbound import OutboundURLRefused, check_outbound_url
from serve_app.inputs.decoding import MEDIA_TYPES
from serve_app.inputs.errors import InputFetchFailed, InputRefused, too_large
from serve_app.settings import ServiceSettings

_ACCEPT = ", ".join(sorted(set(MEDIA_TYPES) - {"image/jpg"}))


async def fetch_image(url: str, param: str, settings: ServiceSettings) -> tuple[bytes, str | None]:
    """The body of an https:// image URL and its declared media type.

    InputRefused (422) for a URL the service won't call or a body over the byte limit;
    InputFetchFailed (424) when the host doesn't answer in time, can't be reached or answers
    anything but a 2xx.
    """
    hosts = {host.lower() for host in settings.image_url_hosts}
    host = (urlsplit(url).hostname or "").lower()
    if host not in hosts:
        hint = " (it has none: send the image as a data: URL)" if not hosts else ""
        raise InputRefused(param, f"host {host!r} is not on this service's image hosts{hint}")
    internal = hosts if settings.image_url_private_hosts else ()
    try:
        await asyncio.to_thread(check_outbound_url, url, schemes={"https"}, allowed_hosts=internal)
    except OutboundURLRefused as error:
        raise InputRefused(param, str(error)) from error
    timeout = settings.image_fetch_timeout_s
    try:
        # One deadline for the whole fetch: httpx's own timeouts apply to each read.
        async with asyncio.timeout(timeout):
            return await _download(url, param, settings)
    except TimeoutError as error:
        message = f"fetching the {param} took longer than {timeout:g} s"
        raise InputFetchFailed(param, message) from error
    except httpx.HTTPError as error:
        raise InputFetchFailed(param, f"the {param} could not be fetched: {error}") from error


async def _download(url: str, param: str, settings: ServiceSettings) -> tuple[bytes, str | None]:
    limit = settings.max_input_image_bytes
    async with (
        httpx.AsyncClient(
            verify=_tls_context(settings.image_fetch_ca_file),
            timeout=settings.image_fetch_timeout_s,
            follow_redirects=False,
            trust_env=False,
        ) as client,
        client.stream("GET", url, headers={"Accept": _ACCEPT}) as response,
    ):
        if not response.is_success:
            raise InputFetchFailed(
                param, f"fetching the {param} answered HTTP {response.status_code}, not a 2xx"
            )
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large(param, int(declared), limit)
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > limit:  # also a compressed body that inflates past the limit
                raise too_large(param, len(body), limit)
        return bytes(body), response.headers.get("content-type")


@lru_cache(maxsize=4)
def _tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Certificate checks against ``ca_file``, or the system's authorities (loaded once)."""
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
