"""URLs the service calls on a client's behalf (webhooks, input images): public hosts only.

A client must not make the service reach into its own network: loopback, private, link-local
(cloud metadata at 169.254.169.254), multicast and reserved addresses are refused unless the
deployer names the host in an allow-list. Every address a host name resolves to is checked, so
one public and one private record do not slip through.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Collection
from urllib.parse import urlsplit


class OutboundURLRefused(ValueError):
    """A URL the service will not call; the message says why, for the client."""


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to; OutboundURLRefused when it resolves to none."""
    try:
        records = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise OutboundURLRefused(f"host {host!r} does not resolve: {error}") from error
    return sorted({str(record[4][0]) for record in records})


def check_outbound_url(
    url: str, *, schemes: Collection[str], allowed_hosts: Collection[str] = ()
) -> None:
    """Raise OutboundURLRefused unless ``url`` has one of ``schemes`` and a host that is in
    ``allowed_hosts`` or resolves only to public addresses. Resolves the host: blocking."""
    parts = urlsplit(url)
    if parts.scheme not in schemes:
        allowed = " or ".join(sorted(schemes))
        raise OutboundURLRefused(f"the URL's scheme must be {allowed}, not {parts.scheme!r}")
    host = parts.hostname
    if not host:
        raise OutboundURLRefused("the URL has no host")
    if parts.username or parts.password:
        raise OutboundURLRefused("the URL must not carry credentials")
    if host in {allowed.lower() for allowed in allowed_hosts}:
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as error:
        raise OutboundURLRefused(f"the URL's port is invalid: {error}") from error
    private = [address for address in resolve(host, port) if not _is_public(address)]
    if private:
        raise OutboundURLRefused(
            f"host {host!r} resolves to a non-public address ({', '.join(private)}); "
            "only public hosts, or hosts on the deployment's allow-list, are called"
        )
