"""Outbound URLs: only public hosts, or allow-listed ones, are called on a client's behalf."""

from __future__ import annotations

import pytest

from serve_app.api.outbound import OutboundURLRefused, check_outbound_url

HTTP = {"http", "https"}


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("http://127.0.0.1:9000/hook", id="loopback"),
        pytest.param("http://localhost/hook", id="localhost-name"),
        pytest.param("http://10.1.2.3/hook", id="private-10"),
        pytest.param("https://192.168.0.7/hook", id="private-192"),
        pytest.param("http://169.254.169.254/latest/meta-data", id="cloud-metadata"),
        pytest.param("http://[::1]/hook", id="ipv6-loopback"),
        pytest.param("http://[::ffff:10.0.0.1]/hook", id="ipv4-mapped-private"),
        pytest.param("http://0.0.0.0/hook", id="unspecified"),
        pytest.param("http://224.0.0.1/hook", id="multicast"),
    ],
)
def test_non_public_addresses_are_refused(url: str) -> None:
    with pytest.raises(OutboundURLRefused, match="non-public address"):
        check_outbound_url(url, schemes=HTTP)


def test_a_public_address_is_accepted() -> None:
    check_outbound_url("https://93.184.215.14/hook", schemes=HTTP)


def test_an_allow_listed_host_is_accepted_even_on_loopback() -> None:
    check_outbound_url("http://127.0.0.1:8123/hook", schemes=HTTP, allowed_hosts=["127.0.0.1"])
    check_outbound_url("http://LocalHost/hook", schemes=HTTP, allowed_hosts=["localhost"])


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        pytest.param("ftp://93.184.215.14/x", "scheme must be http or https", id="scheme"),
        pytest.param("file:///etc/passwd", "scheme must be", id="file"),
        pytest.param("https:///path", "no host", id="no-host"),
        pytest.param("https://user:pw@93.184.215.14/", "credentials", id="credentials"),
        pytest.param("https://93.184.215.14:99999/", "port is invalid", id="bad-port"),
        pytest.param("https://no-such-host.invalid/", "does not resolve", id="unresolvable"),
    ],
)
def test_malformed_urls_are_refused_with_a_reason(url: str, reason: str) -> None:
    with pytest.raises(OutboundURLRefused, match=reason):
        check_outbound_url(url, schemes=HTTP)
