"""A real HTTPS image host for the tests: http.server behind TLS on 127.0.0.1, with a certificate
made here by a throwaway certificate authority (the client trusts it through a setting)."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

HOST = "localhost"

Respond = Callable[[BaseHTTPRequestHandler], None]
"""Answers one GET."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: str
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A certificate authority and a server certificate for localhost and 127.0.0.1 signed by
    it: (CA file, server certificate, server key), as PEM files."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        _certificate("flux-serve test CA", ca_key, "flux-serve test CA")
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName(HOST), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = (
        _certificate(HOST, server_key, "flux-serve test CA")
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "ca.pem", folder / "server.pem", folder / "server-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def answer(status: int, body: bytes = b"", content_type: str = "image/png") -> Respond:
    """A plain answer with a Content-Length."""

    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return respond


def endless(chunk: bytes, stop: threading.Event) -> Respond:
    """A body without a Content-Length that goes on until the client hangs up."""

    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.end_headers()
        while not stop.is_set():
            try:
                handler.wfile.write(chunk)
            except OSError:  # the client hung up: what this answer waits for
                return

    return respond


def stalled(stop: threading.Event) -> Respond:
    """Headers, then nothing until the test ends: a host that hangs mid-answer."""

    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        handler.wfile.flush()
        stop.wait(60)

    return respond


@dataclass(frozen=True)
class ImageHost:
    """A running HTTPS host: its base URL, the CA that signed its certificate, what it serves."""

    url: str
    ca_file: Path
    routes: dict[str, Respond]
    stop: threading.Event

    def at(self, path: str) -> str:
        """The URL of ``path`` on this host."""
        return f"{self.url}{path}"


@contextmanager
def https_image_host(folder: Path) -> Iterator[ImageHost]:
    """Serve HTTPS on 127.0.0.1 until the block ends; set ``routes`` on the yielded host."""
    ca_file, certificate, key = make_certificates(folder)
    routes: dict[str, Respond] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            routes.get(self.path, answer(404, b"not found", "text/plain"))(self)

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: the tests say what went wrong."""

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate, key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.05},
        name="https-image-host",
        daemon=True,
    )
    thread.start()
    stop = threading.Event()
    try:
        yield ImageHost(f"https://{HOST}:{server.server_address[1]}", ca_file, routes, stop)
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
