"""worker.streams against real loopback sockets: data, timeouts, errors, TLS with SNI."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import httpcore
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from worker.streams import dial_tcp

LOOPBACK = ipaddress.ip_address("127.0.0.1")


Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def _serve(handler: Handler, nursery: trio.Nursery) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


def test_reads_what_the_server_sends_then_eof() -> None:
    trio.run(_reads_what_the_server_sends_then_eof)


async def _reads_what_the_server_sends_then_eof() -> None:
    async def handler(stream: trio.SocketStream) -> None:
        assert await stream.receive_some(1024) == b"hello"
        await stream.send_all(b"x" * 200_000)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        port = await _serve(handler, nursery)
        stream = await dial_tcp(LOOPBACK, port, 5.0, None)
        await stream.write(b"hello", timeout=5.0)
        received = b""
        while chunk := await stream.read(65536, timeout=5.0):
            received += chunk
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert received == b"x" * 200_000


def test_read_timeout_and_closed_stream() -> None:
    trio.run(_read_timeout_and_closed_stream)


async def _read_timeout_and_closed_stream() -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        port = await _serve(handler, nursery)
        stream = await dial_tcp(LOOPBACK, port, 5.0, None)
        assert stream.get_extra_info("server_addr") == ("127.0.0.1", port)
        assert stream.get_extra_info("is_readable") is False
        with pytest.raises(httpcore.ReadTimeout):
            await stream.read(1024, timeout=0.2)
        await stream.aclose()
        with pytest.raises(httpcore.ReadError):
            await stream.read(1024, timeout=0.2)
        nursery.cancel_scope.cancel()


def test_refused_connection_is_a_connect_error() -> None:
    trio.run(_refused_connection_is_a_connect_error)


async def _refused_connection_is_a_connect_error() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(httpcore.ConnectError):
        await dial_tcp(LOOPBACK, port, 5.0, [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)])


def _certificate(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "img.example.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("img.example.test")]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_verifies_the_name_and_carries_data(tmp_path: Path) -> None:
    trio.run(_tls_round_trip, *_certificate(tmp_path))


async def _tls_round_trip(cert: Path, key: Path) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))

    async def handler(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, server_context, server_side=True)
        try:
            request = await tls.receive_some(1024)
            await tls.send_all(b"echo:" + request)
            await tls.aclose()
        except trio.BrokenResourceError:
            return

    async with trio.open_nursery() as nursery:
        port = await _serve(handler, nursery)
        plain = await dial_tcp(LOOPBACK, port, 5.0, None)
        tls = await plain.start_tls(client_context, "img.example.test", timeout=5.0)
        await tls.write(b"ping", timeout=5.0)
        assert await tls.read(1024, timeout=5.0) == b"echo:ping"
        await tls.aclose()
        wrong = await dial_tcp(LOOPBACK, port, 5.0, None)
        with pytest.raises(httpcore.ConnectError):
            await wrong.start_tls(client_context, "other.example.test", timeout=5.0)
        nursery.cancel_scope.cancel()
