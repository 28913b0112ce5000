"""A hostile HTTP server on loopback, and the fake network that routes the tests to it.

The server is a tiny HTTP/1.1 responder on Trio: each route is an async function that
writes raw bytes (or sleeps, drips, resets), so that tests can script exactly the
misbehaviour a download worker meets on the web. It runs inside the test's own
``trio.run``, so a ``MockClock`` drives its sleeps as well as the worker's timeouts.

``FakeDNS`` maps fake public host names to public-looking addresses and
``LoopbackDialer`` carries a connection to such an address onto loopback: the SSRF guard
in the worker stays on and judges the public-looking address.
"""

from __future__ import annotations

import gzip
import io
import ipaddress
import queue
import socket
import struct
import threading
import zlib
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import httpcore
import trio
from PIL import Image

from worker.addresses import IPAddress
from worker.errors import DNSFailure
from worker.network import SocketOption, TrioDialer

PUBLIC_IP = ipaddress.ip_address("93.184.216.34")
OTHER_PUBLIC_IP = ipaddress.ip_address("151.101.1.69")
T = TypeVar("T")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]


Handler = Callable[[trio.SocketStream, Request], Awaitable[None]]


def head(status: int, headers: dict[str, str] | None = None, length: int | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} X"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def respond(stream: trio.SocketStream, status: int, body: bytes = b"",
                  headers: dict[str, str] | None = None) -> None:
    await stream.send_all(head(status, headers, len(body)) + body)


def route_ok(body: bytes, content_type: str = "image/jpeg",
             headers: dict[str, str] | None = None) -> Handler:
    async def handler(stream: trio.SocketStream, request: Request) -> None:
        await respond(stream, 200, body, {"Content-Type": content_type, **(headers or {})})
    return handler


def route_status(status: int, headers: dict[str, str] | None = None) -> Handler:
    async def handler(stream: trio.SocketStream, request: Request) -> None:
        await respond(stream, status, b"no", headers)
    return handler


def route_slow_first_byte(delay: float, body: bytes) -> Handler:
    async def handler(stream: trio.SocketStream, request: Request) -> None:
        await trio.sleep(delay)
        await respond(stream, 200, body, {"Content-Type": "image/jpeg"})
    return handler


def route_drip(body: bytes, every: float = 1.0) -> Handler:
    async def handler(stream: trio.SocketStream, request: Request) -> None:
        await stream.send_all(head(200, {"Content-Type": "image/jpeg"}, len(body)))
        for i in range(len(body)):
            await stream.send_all(body[i:i + 1])
            await trio.sleep(every)
    return handler


#: a JPEG's first bytes: what the worker's sniff (``worker.sniff``) lets through
JPEG_START = b"\xff\xd8\xff\xe0"


def route_stream(total: int, declare: bool, chunk: int = 256 * 1024) -> Handler:
    """``total`` bytes: a JPEG's first bytes, then zeros; with or without Content-Length."""
    async def handler(stream: trio.SocketStream, request: Request) -> None:
        await stream.send_all(head(200, {"Content-Type": "image/jpeg"},
                                   total if declare else None))
        block = b"\0" * chunk
        await stream.send_all(JPEG_START + block[len(JPEG_START):])
        for _ in range(total // chunk - 1):
            await stream.send_all(block)
    return handler


def route_reset() -> Handler:
    async def handler(stream: trio.SocketStream, request: Request) -> None:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()
    return handler


def route_redirect(location: str, status: int = 302) -> Handler:
    return route_status(status, {"Location": location})


@dataclass
class Sequenced:
    """Answers with each handler in turn, then repeats the last one."""

    handlers: list[Handler]
    calls: int = 0

    async def __call__(self, stream: trio.SocketStream, request: Request) -> None:
        handler = self.handlers[min(self.calls, len(self.handlers) - 1)]
        self.calls += 1
        await handler(stream, request)


@dataclass
class HostileServer:
    routes: dict[str, Handler]
    host: str = "127.0.0.1"
    port: int = 0
    fallback: Handler | None = None  # for paths not in ``routes`` (default: 404)
    connections: int = 0
    requests: list[Request] = field(default_factory=list)

    async def run(self, *, task_status: trio.TaskStatus[HostileServer] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._serve, listeners)

    async def _serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            request = await _read_request(stream)
            if request is None:
                return
            self.requests.append(request)
            path = request.path.split("?")[0]
            # a robots.txt the test did not script is a 404 (as on most sites)
            handler = self.routes.get(path, None if path == "/robots.txt" else self.fallback)
            await (handler or route_status(404))(stream, request)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        finally:
            if stream.socket.fileno() != -1:
                await stream.aclose()

    def url(self, path: str, host: str = "img.example.test") -> str:
        return f"http://{host}:{self.port}{path}"


async def read_head(stream: trio.SocketStream) -> bytes | None:
    """What the client sent up to the end of a request head (and what came with it);
    None when it closed before."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        data += chunk
    return data


async def _read_request(stream: trio.SocketStream) -> Request | None:
    data = await read_head(stream)
    if data is None:
        return None
    lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return Request(method, path, {k.lower(): v for k, v in headers.items()})


async def start_server(nursery: trio.Nursery, routes: dict[str, Handler],
                       host: str = "127.0.0.1", fallback: Handler | None = None
                       ) -> HostileServer:
    server: HostileServer = await nursery.start(
        HostileServer(routes, host=host, fallback=fallback).run)
    return server


# -- the fake network ---------------------------------------------------------------------


@dataclass
class FakeDNS:
    """Answers from a table; unknown names fail like NXDOMAIN. Counts lookups."""

    table: dict[str, list[IPAddress]]
    lookups: list[str] = field(default_factory=list)

    async def resolve(self, host: str) -> list[IPAddress]:
        self.lookups.append(host)
        await trio.lowlevel.checkpoint()
        if host not in self.table:
            raise DNSFailure(f"{host}: NXDOMAIN (fake)")
        return self.table[host]


@dataclass
class LoopbackDialer:
    """Carries connections for public-looking addresses onto loopback, same port."""

    routes: dict[IPAddress, str]
    dialed: list[tuple[IPAddress, int]] = field(default_factory=list)
    _trio: TrioDialer = field(default_factory=TrioDialer)

    async def dial(self, address: IPAddress, port: int, connect_timeout: float | None,
                   socket_options: Iterable[SocketOption] | None
                   ) -> httpcore.AsyncNetworkStream:
        self.dialed.append((address, port))
        target = self.routes.get(address)
        if target is None:
            raise httpcore.ConnectError(f"{address} unreachable (fake network)")
        return await self._trio.dial(ipaddress.ip_address(target), port, connect_timeout,
                                     socket_options)


def fake_network(names: dict[str, str] | None = None) -> tuple[FakeDNS, LoopbackDialer]:
    """``img.example.test`` -> PUBLIC_IP -> 127.0.0.1 (and any extra names given)."""
    table = {"img.example.test": [PUBLIC_IP], "cdn.example.test": [OTHER_PUBLIC_IP]}
    table.update({name: [ipaddress.ip_address(ip)] for name, ip in (names or {}).items()})
    return FakeDNS(table), LoopbackDialer({PUBLIC_IP: "127.0.0.1", OTHER_PUBLIC_IP: "127.0.0.1"})


# -- bodies -------------------------------------------------------------------------------


def jpeg_bytes(width: int = 320, height: int = 240, seed: int = 0, quality: int = 90,
               exif_orientation: int | None = None) -> bytes:
    """A noisy JPEG (noise keeps it above the 5 KB rule at small sizes)."""
    image = Image.effect_noise((width, height), 64 + seed % 32).convert("RGB")
    out = io.BytesIO()
    exif = Image.Exif()
    if exif_orientation is not None:
        exif[0x0112] = exif_orientation
    image.save(out, format="JPEG", quality=quality, exif=exif.tobytes())
    return out.getvalue()


def png_bytes(width: int, height: int, mode: str = "RGBA", color: tuple[int, ...] = (0, 0, 0, 0)
              ) -> bytes:
    image = Image.new(mode, (width, height), color)
    noise = Image.effect_noise((width, height), 80).convert("L")
    if mode == "RGBA":
        image.putalpha(noise.point(lambda v: 0 if v < 128 else 255))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def png_bomb_header(width: int = 30000, height: int = 30000, pad: int = 8192) -> bytes:
    """A PNG whose header declares ``width`` x ``height``, padded past the 5 KB rule."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    text = chunk(b"tEXt", b"Comment\0" + b"x" * pad)
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 1024))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + text + idat + chunk(b"IEND", b"")


def gzip_bomb(decoded: int = 200 * 1024 * 1024) -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9) as gz:
        block = b"\0" * (1024 * 1024)
        gz.write(JPEG_START)
        for _ in range(decoded // len(block)):
            gz.write(block)
    return out.getvalue()


def brotli_bomb(decoded: int = 200 * 1024 * 1024) -> bytes:
    import brotli

    compressor = brotli.Compressor(quality=5)
    block = b"\0" * (1024 * 1024)
    parts = [compressor.process(JPEG_START)]
    parts += [compressor.process(block) for _ in range(decoded // len(block))]
    return b"".join(parts) + compressor.finish()


@contextmanager
def trio_thread(start: Callable[[trio.Nursery], Awaitable[T]]) -> Iterator[T]:
    """What ``start`` starts in a nursery of a Trio loop in its own thread (for tests that
    run subprocesses), cancelled and joined on exit."""
    ready: queue.Queue[tuple[T, trio.lowlevel.TrioToken, trio.CancelScope]] = queue.Queue()

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            started = await start(nursery)
            ready.put((started, trio.lowlevel.current_trio_token(), nursery.cancel_scope))

    thread = threading.Thread(target=trio.run, args=(serve,), daemon=True)
    thread.start()
    started, token, scope = ready.get(timeout=30)
    try:
        yield started
    finally:
        trio.from_thread.run_sync(scope.cancel, trio_token=token)
        thread.join(30)


@contextmanager
def server_thread(routes: dict[str, Handler], host: str = "127.0.0.1",
                  fallback: Handler | None = None) -> Iterator[HostileServer]:
    """The server in a thread with its own Trio loop, for tests that run subprocesses."""
    with trio_thread(lambda nursery: start_server(nursery, routes, host, fallback)) as server:
        yield server


def route_chunked(body: bytes, content_type: str = "image/jpeg",
                  headers: dict[str, str] | None = None, chunk: int = 256 * 1024) -> Handler:
    """``body`` with ``Transfer-Encoding: chunked``: no length is known before the end."""
    async def handler(stream: trio.SocketStream, request: Request) -> None:
        await stream.send_all(head(200, {"Content-Type": content_type,
                                         "Transfer-Encoding": "chunked", **(headers or {})}))
        for start in range(0, len(body), chunk):
            part = body[start:start + chunk]
            await stream.send_all(b"%x\r\n%b\r\n" % (len(part), part))
        await stream.send_all(b"0\r\n\r\n")
    return handler


def padded_jpeg(total: int, width: int = 640, height: int = 480) -> bytes:
    """A small JPEG followed by zeros up to ``total`` bytes (decoders stop at its end)."""
    image = jpeg_bytes(width, height)
    return image + b"\0" * (total - len(image))


def flat_image(width: int, height: int, fmt: str, mode: str = "RGB", **save: object) -> bytes:
    """One colour over ``width`` x ``height``: a small file that decodes to many pixels."""
    color = (200, 120, 40, 128)[:len(mode)] if mode in ("RGB", "RGBA") else 128
    out = io.BytesIO()
    Image.new(mode, (width, height), color).save(out, format=fmt, **save)
    return out.getvalue()


def gzip_bytes(body: bytes) -> bytes:
    return gzip.compress(body, compresslevel=6)
