"""A local image server with realistic behaviour, for the worker benchmark.

``python -m bench.image_server --hosts 16 --pool-dir DIR`` listens on ``--hosts`` loopback
addresses (``host_address``: 127.0.0.1..254, then 127.0.1.1 and on; one port, printed as
``READY <port>``) and serves ``/img/<n>.jpg``: JPEGs of 20-400 KB and 200-2000 px, and a
deterministic 25 % of failures (404, 500, connection reset, HTML served as image/jpeg, a
2 KB image). The first byte comes after 50-300 ms; with ``--web real`` (the real-web
latency mix of issue 12) 3 % of the answers come after 2-20 s instead.
The behaviour of URL ``n`` depends only on ``n``, ``--seed`` and ``--web``, so every tool
run against the same list meets the same server.
"""

from __future__ import annotations

import argparse
import io
import random
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
from PIL import Image

FAILURES = (("404", 0.08), ("500", 0.05), ("reset", 0.04), ("html", 0.04), ("small", 0.04))


def make_jpeg(rng: random.Random) -> bytes:
    """A textured JPEG (gradient, fractal, noise), 200-2000 px a side."""
    width = rng.randint(200, 2000)
    height = max(200, min(2000, int(width * rng.uniform(0.6, 1.4))))
    gradient = Image.linear_gradient("L").resize((width, height))
    extent = (-2 + rng.random(), -1.2, 0.6 + rng.random(), 1.2)
    fractal = Image.effect_mandelbrot((width, height), extent, 30)
    noise = Image.effect_noise((width, height), rng.choice([4, 8, 16]))
    out = io.BytesIO()
    Image.merge("RGB", (gradient, fractal, noise)).save(out, "JPEG",
                                                        quality=rng.randint(70, 90))
    return out.getvalue()


def image_pool(directory: Path, count: int, seed: int) -> list[bytes]:
    """``count`` JPEGs of 20-400 KB, made once and kept in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    files = sorted(directory.glob("*.jpg"))
    if len(files) >= count:
        return [f.read_bytes() for f in files[:count]]
    rng = random.Random(seed)
    pool: list[bytes] = []
    while len(pool) < count:
        data = make_jpeg(rng)
        if 20 * 1024 <= len(data) <= 400 * 1024:
            (directory / f"{len(pool):04d}.jpg").write_bytes(data)
            pool.append(data)
    return pool


#: share of slow answers and their first-byte delay range (s) in the real-web mix
SLOW_SHARE, SLOW_DELAY = 0.03, (2.0, 20.0)


def host_address(index: int) -> str:
    """The loopback address of host ``index`` (0-based): 127.0.0.1..254, 127.0.1.1.."""
    return f"127.0.{index // 254}.{index % 254 + 1}"


def behaviour(n: int, seed: int, web: str = "uniform") -> tuple[str, float]:
    """URL ``n``'s answer kind and first-byte delay (s)."""
    rng = random.Random(seed * 1_000_003 + n)
    delay = rng.uniform(0.05, 0.3)
    if web == "real" and rng.random() < SLOW_SHARE:
        delay = rng.uniform(*SLOW_DELAY)
    roll = rng.random()
    for name, share in FAILURES:
        if roll < share:
            return name, delay
        roll -= share
    return "ok", delay


class Server:
    def __init__(self, pool: list[bytes], seed: int, web: str = "uniform") -> None:
        self.pool = pool
        self.seed = seed
        self.web = web
        self.small = _small_jpeg()

    async def handle(self, stream: trio.SocketStream) -> None:
        await answer_request(stream, self._answer)

    async def _answer(self, stream: trio.SocketStream, path: str) -> None:
        try:
            n = int(path.rsplit("/", 1)[-1].split(".", maxsplit=1)[0])
        except ValueError:
            await _send(stream, 404, b"not found", "text/plain")
            return
        kind, delay = behaviour(n, self.seed, self.web)
        await trio.sleep(delay)
        if kind == "ok":
            await _send(stream, 200, self.pool[n % len(self.pool)], "image/jpeg")
        elif kind in ("404", "500"):
            await _send(stream, int(kind), b"error", "text/plain")
        elif kind == "html":
            await _send(stream, 200, b"<html>" + b"<p>hi</p>" * 1200, "image/jpeg")
        elif kind == "small":
            await _send(stream, 200, self.small, "image/jpeg")
        else:
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     struct.pack("ii", 1, 0))
            stream.socket.close()


def _small_jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(out, "JPEG", quality=80)
    return out.getvalue()


async def answer_request(stream: trio.SocketStream,
                         answer: Callable[[trio.SocketStream, str], Awaitable[None]]) -> None:
    """Read one request's path and ``answer`` it; a client going away ends it quietly, and
    the stream is closed (shared with ``bench.soak``)."""
    try:
        path = await _read_path(stream)
        if path is not None:
            await answer(stream, path)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        if stream.socket.fileno() != -1:
            await stream.aclose()


async def _read_path(stream: trio.SocketStream) -> str | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(16384)
        if not chunk:
            return None
        data += chunk
    return data.split(b" ", 2)[1].decode("latin-1")


async def _send(stream: trio.SocketStream, status: int, body: bytes, ctype: str) -> None:
    head = (f"HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode()
    await stream.send_all(head + body)


async def serve(hosts: int, port: int, server: Server) -> None:
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1", backlog=4096)
    port = listeners[0].socket.getsockname()[1]
    for i in range(1, hosts):
        listeners += await trio.open_tcp_listeners(port, host=host_address(i), backlog=4096)
    print(f"READY {port}", flush=True)
    await trio.serve_listeners(server.handle, listeners)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", type=int, default=16)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool-size", type=int, default=48)
    parser.add_argument("--pool-dir", type=Path, default=Path("bench/out/pool"))
    parser.add_argument("--web", choices=("uniform", "real"), default="uniform",
                        help="latency mix: uniform 50-300 ms, or real (3 %% after 2-20 s)")
    args = parser.parse_args()
    pool = image_pool(args.pool_dir, args.pool_size, args.seed)
    print(f"pool: {len(pool)} JPEGs, {sum(map(len, pool)) // len(pool) // 1024} KB mean",
          file=sys.stderr, flush=True)
    try:
        trio.run(serve, args.hosts, args.port, Server(pool, args.seed, args.web))
    except KeyboardInterrupt:
        return


if __name__ == "__main__":
    main()
