"""CPU per URL of fetching alone, from bare sockets up to the worker's fetcher.

``python -m bench.http_floor --urls 3000`` starts ``bench.image_server`` (the worker
benchmark's server: 16 loopback hosts, first byte after 50-300 ms, JPEGs of 20-400 KB,
25 % failures, one request per connection), writes the worker benchmark's URL list,
then fetches every URL with each client below, one after the other, each in its own
process, on Trio with ``--concurrency`` requests in flight, reading every body to its
end and decoding nothing:

- ``trio-socket``: ``trio.open_tcp_stream``, one GET written by hand, the response read
  until the server closes; no HTTP parsing at all: the event loop's and the kernel's part;
- ``httptools``: the same sockets, the response parsed by ``httptools`` (llhttp, the
  C parser uvicorn uses): status, headers and body chunks, the end of the message; the
  floor of an HTTP/1.1 client whose parsing is not Python's;
- ``httpcore``: ``httpcore.AsyncConnectionPool`` (h11 parsing, connection pool);
- ``httpx``: ``httpx.AsyncClient`` streaming each response;
- ``pairfarm``: the worker's ``Stage.fetch`` (``worker.batch.open_stage``: SSRF guard,
  DNS cache, host gate, redirects, deadline, opt-out and size checks, metrics).

Prints CPU milliseconds per URL (user + system of the process, from ``wait4``) and wall
seconds for each. Set beside ``bench.bench_decode``'s ceiling, these say how much CPU the
network side of the worker needs whatever the image work costs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

from bench.options import server_arguments

MODES = ("trio-socket", "httptools", "httpcore", "httpx", "pairfarm")
#: fetches one URL to the end of its body: the bytes read, None when it failed
Get = Callable[[str], Awaitable[int | None]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    server_arguments(parser)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--listing", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        fetch_all(args.mode, args.listing, args.concurrency)
        return
    compare(args)


def compare(args: argparse.Namespace) -> None:
    from bench.bench_worker import start_server, url_list
    from bench.image_server import image_pool

    image_pool(args.pool_dir, 48, 0)
    server, port = start_server(args.hosts, args.pool_dir, args.web)
    try:
        with tempfile.TemporaryDirectory(prefix="pairfarm-floor-") as tmp:
            listing = Path(tmp) / "urls.parquet"
            url_list(listing, args.urls, args.hosts, port, args.web)
            print(f"{args.urls} URLs over {args.hosts} loopback hosts, concurrency "
                  f"{args.concurrency}, {os.cpu_count()} cores")
            print(f"{'client':12s} {'complete':>8s} {'MB':>7s} {'wall s':>7s} {'CPU s':>7s} "
                  f"{'CPU ms/URL':>10s}")
            for mode in MODES:
                run_mode(mode, listing, args)
    finally:
        server.terminate()
        server.wait(10)


def run_mode(mode: str, listing: Path, args: argparse.Namespace) -> None:
    argv = [sys.executable, "-m", "bench.http_floor", "--mode", mode, "--listing",
            str(listing), "--concurrency", str(args.concurrency)]
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env, cwd=root)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    assert proc.stdout is not None
    answer = proc.stdout.read().split()
    proc.stdout.close()
    if os.waitstatus_to_exitcode(status) != 0 or len(answer) != 3:
        sys.exit(f"{mode} failed: {answer}")
    complete, megabytes, loop_cpu = int(answer[0]), float(answer[1]), float(answer[2])
    cpu = usage.ru_utime + usage.ru_stime
    urls = int(args.urls)
    print(f"{mode:12s} {complete:8d} {megabytes:7.0f} {wall:7.1f} {cpu:7.1f} "
          f"{1000 * cpu / urls:10.2f}   (fetch loop alone {1000 * loop_cpu / urls:.2f})",
          flush=True)


def fetch_all(mode: str, listing: Path, concurrency: int) -> None:
    """Child process: fetch every URL of ``listing`` with ``mode``; prints the responses
    read to the end, the megabytes read and the CPU seconds of the fetch loop."""
    import pyarrow.parquet as pq
    import trio

    urls = pq.read_table(listing, columns=["url"]).column("url").to_pylist()
    fetch = FETCHERS[mode]
    totals = [0, 0]

    async def run() -> None:
        limit = trio.CapacityLimiter(concurrency)
        async with fetch() as get:
            async def one(url: str) -> None:
                async with limit:
                    size = await get(url)
                if size is not None:
                    totals[0] += 1
                    totals[1] += size

            async with trio.open_nursery() as nursery:
                for url in urls:
                    nursery.start_soon(one, url)

    before = time.process_time()
    trio.run(run)
    print(totals[0], totals[1] / 1e6, time.process_time() - before)


async def _drained(chunks: AsyncIterator[bytes]) -> int:
    """The bytes of a body, read to its end."""
    size = 0
    async for chunk in chunks:
        size += len(chunk)
    return size


def _get_request(url: str) -> tuple[str, int, bytes]:
    """The host, port and bytes of a hand-written GET of ``url`` on its own connection."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    request = (f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
               "Connection: close\r\n\r\n").encode()
    return parts.hostname or "", parts.port or 80, request


@asynccontextmanager
async def _socket_fetcher() -> AsyncIterator[Get]:
    import trio

    async def get(url: str) -> int | None:
        host, port, request = _get_request(url)
        size = 0
        try:
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(request)
                while data := await stream.receive_some(65536):
                    size += len(data)
        except (OSError, trio.BrokenResourceError):
            return None
        return size

    yield get


class _Response:
    """``httptools`` parser callbacks: the headers, the body's size, the message's end."""

    def __init__(self) -> None:
        self.size = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.size += len(body)

    def on_message_complete(self) -> None:
        self.done = True


@asynccontextmanager
async def _httptools_fetcher() -> AsyncIterator[Get]:
    import httptools
    import trio

    async def get(url: str) -> int | None:
        host, port, request = _get_request(url)
        response = _Response()
        parser = httptools.HttpResponseParser(response)
        try:
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(request)
                while not response.done and (data := await stream.receive_some(65536)):
                    parser.feed_data(data)
        except (OSError, trio.BrokenResourceError, httptools.HttpParserError):
            return None
        return response.size if response.done else None

    yield get


@asynccontextmanager
async def _httpcore_fetcher() -> AsyncIterator[Get]:
    import httpcore

    async with httpcore.AsyncConnectionPool(max_connections=1024) as pool:
        async def get(url: str) -> int | None:
            try:
                async with pool.stream("GET", url) as response:
                    return await _drained(response.aiter_stream())
            except httpcore.NetworkError:
                return None

        yield get


@asynccontextmanager
async def _httpx_fetcher() -> AsyncIterator[Get]:
    import httpx

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=1024)) as client:
        async def get(url: str) -> int | None:
            try:
                async with client.stream("GET", url) as response:
                    return await _drained(response.aiter_raw())
            except httpx.TransportError:
                return None

        yield get


@asynccontextmanager
async def _pairfarm_fetcher() -> AsyncIterator[Get]:
    from worker.addresses import AddressPolicy, parse_cidrs
    from worker.batch import Network, open_stage
    from worker.errors import FetchFailure
    from worker.resolver import SystemResolver
    from worker.settings import FetchSettings, ImageSettings, PipelineSettings

    fetch = FetchSettings(concurrency=1024, per_host=16, read_timeout=10,
                          policy=AddressPolicy(allow_cidrs=parse_cidrs(["127.0.0.0/8"])))
    settings = PipelineSettings(fetch=fetch, image=ImageSettings())
    async with open_stage(settings, Network(resolver=SystemResolver())) as stage:
        async def get(url: str) -> int | None:
            try:
                return len((await stage.fetch(url)).body)
            except FetchFailure:
                return None

        yield get


FETCHERS: dict[str, Callable[[], AbstractAsyncContextManager[Get]]] = {
    "trio-socket": _socket_fetcher, "httptools": _httptools_fetcher,
    "httpcore": _httpcore_fetcher, "httpx": _httpx_fetcher,
    "pairfarm": _pairfarm_fetcher}


if __name__ == "__main__":
    main()
