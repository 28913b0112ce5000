"""Soak: one real worker against a real coordinator on a hostile web, its RSS sampled.

``python -m bench.soak --minutes 30`` starts, each in its own process:

- an embedded PostgreSQL (``coordinator.embedded_pg``), migrated, with ``--urls``
  candidates ingested by ``pairfarm ingest`` and a token made by ``pairfarm token create``;
- ``pairfarm coordinator`` on it (``--batch-size``, 1,000 by default, so that progress is
  fine-grained);
- the hostile server below on 127.0.0.1..16 (``python -m bench.soak --serve``);
- ``pairfarm worker`` with its default settings (concurrency, per-host limit, body cap,
  memory budget), only ``--allow-cidr 127.0.0.0/8`` and a metrics port added.

Every second it samples the summed RSS of the worker's process tree and the URLs the
worker has finished (``pairfarm_worker_fetch_duration_seconds_count``: one observation per
URL, failures included). After ``--minutes`` it prints the peak RSS, URLs/s, the outcome
counts (``pairfarm_worker_url_outcomes_total``) and the RSS growth per 10k URLs: the slope
of a least-squares line of RSS against URLs done over the samples after ``--warmup``
seconds. A leak shows as a growth that stays positive however long the run; ``--csv``
keeps the samples.

The hostile mix (the share of URL ``n``'s behaviour depends only on ``n``): JPEGs of
20-400 KB (most), a first byte after 2 s, bodies dripped over ~3 s, a body that stalls
past the deadline, connection resets, bodies just under the 16 MB cap, a declared body
over it, a chunked body that streams past it, a gzip bomb (200 MB of zeros in ~200 KB), a
PNG declaring 30,000 x 30,000 pixels, HTML as ``text/html`` and as ``image/jpeg``,
redirects (to an image, and in a loop), 503 with ``Retry-After: 1`` and with a date a
year ahead, and 404.
"""

from __future__ import annotations

import argparse
import email.utils
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import trio

from bench.image_server import answer_request, image_pool

REPO = Path(__file__).resolve().parent.parent
CAP = 16 * 1024 * 1024  # the worker's default --max-body-mb

#: (behaviour, share of the URLs); the shares sum to 1
MIX: tuple[tuple[str, float], ...] = (
    ("ok", 0.508), ("slow_first_byte", 0.04), ("drip", 0.06), ("stall", 0.01),
    ("reset", 0.05), ("huge", 0.04), ("over_cap", 0.02), ("chunked_over_cap", 0.02),
    ("gzip_bomb", 0.03), ("pixel_bomb", 0.02), ("html", 0.04), ("html_as_jpeg", 0.03),
    ("redirect", 0.05), ("redirect_loop", 0.02), ("retry_after", 0.03),
    ("retry_date", 0.001), ("404", 0.031),
)


def behaviour(n: int, seed: int) -> str:
    roll = random.Random(seed * 1_000_003 + n).random()
    for name, share in MIX:
        if roll < share:
            return name
        roll -= share
    return "ok"


# -- the hostile server (a subprocess: --serve) ----------------------------------------

@dataclass
class Bodies:
    """The bodies the server sends, made once."""

    pool: list[bytes]
    huge: bytes = b""
    gzip_bomb: bytes = b""
    pixel_bomb: bytes = b""
    html: bytes = b"<!doctype html><html><body>" + b"<p>not an image</p>" * 800 + b"</body></html>"

    def __post_init__(self) -> None:
        self.huge = _padded(self.pool[0], CAP - 64 * 1024)
        self.gzip_bomb = _gzip_zeros(200 * 1024 * 1024)
        self.pixel_bomb = _png_header(30_000, 30_000)


def _padded(jpeg: bytes, total: int) -> bytes:
    """A JPEG followed by zeros up to ``total`` bytes (decoders stop at the end marker)."""
    return jpeg + bytes(total - len(jpeg))


def _gzip_zeros(size: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    parts = [packer.compress(block) for _ in range(size // len(block))]
    return b"".join(parts) + packer.flush()


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(random.Random(0).randbytes(8192), 0)  # over the 5 KB floor
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} X", *(f"{k}: {v}" for k, v in headers.items()),
             "Connection: close", "", ""]
    return "\r\n".join(lines).encode()


class HostileServer:
    def __init__(self, bodies: Bodies, seed: int, port: int) -> None:
        self.bodies = bodies
        self.seed = seed
        self.port = port

    async def handle(self, stream: trio.SocketStream) -> None:
        await answer_request(stream, self._answer)

    async def _answer(self, stream: trio.SocketStream, path: str) -> None:
        match = re.fullmatch(r"/s/(\d+)(?:/loop(\d+))?\.jpg", path)
        if match is None:
            await stream.send_all(_head(404, {"Content-Length": "0"}))
            return
        n = int(match.group(1))
        kind = behaviour(n, self.seed) if match.group(2) is None else "redirect_loop"
        jpeg = self.bodies.pool[n % len(self.bodies.pool)]
        await trio.sleep(0.02)
        await _SENDERS[kind](Ask(self, stream, n, jpeg, match.group(2)))


@dataclass
class Ask:
    """One request: the server, the connection, the URL's number, its JPEG, its loop hop."""

    srv: HostileServer
    stream: trio.SocketStream
    n: int
    jpeg: bytes
    hop: str | None


async def _send(stream: trio.SocketStream, status: int, body: bytes, ctype: str = "image/jpeg",
                **extra: str) -> None:
    headers = {"Content-Type": ctype, "Content-Length": str(len(body)),
               **{k.replace("_", "-"): v for k, v in extra.items()}}
    await stream.send_all(_head(status, headers) + body)


async def _ok(ask: Ask) -> None:
    await _send(ask.stream, 200, ask.jpeg)


async def _slow_first_byte(ask: Ask) -> None:
    await trio.sleep(2.0)
    await _send(ask.stream, 200, ask.jpeg)


async def _drip(ask: Ask) -> None:
    await ask.stream.send_all(_head(200, {"Content-Type": "image/jpeg",
                                          "Content-Length": str(len(ask.jpeg))}))
    step = -(-len(ask.jpeg) // 20)  # 20 pieces, one every 0.15 s
    for start in range(0, len(ask.jpeg), step):
        await trio.sleep(0.15)
        await ask.stream.send_all(ask.jpeg[start:start + step])


async def _stall(ask: Ask) -> None:
    await ask.stream.send_all(_head(200, {"Content-Type": "image/jpeg",
                                          "Content-Length": str(len(ask.jpeg))})
                              + ask.jpeg[:1000])
    await trio.sleep(120)


async def _reset(ask: Ask) -> None:
    ask.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ask.stream.socket.close()


async def _huge(ask: Ask) -> None:
    await _send(ask.stream, 200, ask.srv.bodies.huge)


async def _over_cap(ask: Ask) -> None:
    await ask.stream.send_all(_head(200, {"Content-Type": "image/jpeg",
                                          "Content-Length": str(CAP * 4)}))
    await ask.stream.send_all(ask.srv.bodies.huge[:1 << 20])


async def _chunked_over_cap(ask: Ask) -> None:
    await ask.stream.send_all(_head(200, {"Content-Type": "image/jpeg",
                                          "Transfer-Encoding": "chunked"}))
    piece = ask.srv.bodies.huge[:256 * 1024]
    for _ in range(CAP // len(piece) + 8):
        await ask.stream.send_all(b"%x\r\n" % len(piece) + piece + b"\r\n")


async def _gzip_bomb(ask: Ask) -> None:
    await _send(ask.stream, 200, ask.srv.bodies.gzip_bomb, Content_Encoding="gzip")


async def _pixel_bomb(ask: Ask) -> None:
    await _send(ask.stream, 200, ask.srv.bodies.pixel_bomb, "image/png")


async def _html(ask: Ask) -> None:
    await _send(ask.stream, 200, ask.srv.bodies.html, "text/html; charset=utf-8")


async def _html_as_jpeg(ask: Ask) -> None:
    await _send(ask.stream, 200, ask.srv.bodies.html)


async def _redirect(ask: Ask) -> None:
    target = next(m for m in range(ask.n + 1, ask.n + 1000) if behaviour(m, ask.srv.seed) == "ok")
    await _send(ask.stream, 302, b"", "text/plain",
                Location=f"http://127.0.0.1:{ask.srv.port}/s/{target}.jpg")


async def _redirect_loop(ask: Ask) -> None:
    await _send(ask.stream, 302, b"", "text/plain",
                Location=f"/s/{ask.n}/loop{(int(ask.hop or 0) + 1) % 2}.jpg")


async def _retry_after(ask: Ask) -> None:
    await _send(ask.stream, 503, b"busy", "text/plain", Retry_After="1")


async def _retry_date(ask: Ask) -> None:
    ahead = email.utils.formatdate(time.time() + 365 * 86400, usegmt=True)
    await _send(ask.stream, 503, b"busy", "text/plain", Retry_After=ahead)


async def _not_found(ask: Ask) -> None:
    await _send(ask.stream, 404, b"not found", "text/plain")


_SENDERS = {
    "ok": _ok, "slow_first_byte": _slow_first_byte, "drip": _drip, "stall": _stall,
    "reset": _reset, "huge": _huge, "over_cap": _over_cap,
    "chunked_over_cap": _chunked_over_cap, "gzip_bomb": _gzip_bomb,
    "pixel_bomb": _pixel_bomb, "html": _html, "html_as_jpeg": _html_as_jpeg,
    "redirect": _redirect, "redirect_loop": _redirect_loop, "retry_after": _retry_after,
    "retry_date": _retry_date, "404": _not_found,
}


def serve(hosts: int, pool_dir: Path, seed: int) -> None:
    bodies = Bodies(image_pool(pool_dir, 48, seed))

    async def main() -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=4096)
        port = listeners[0].socket.getsockname()[1]
        for i in range(2, hosts + 1):
            listeners += await trio.open_tcp_listeners(port, host=f"127.0.0.{i}", backlog=4096)
        print(f"READY {port}", flush=True)
        await trio.serve_listeners(HostileServer(bodies, seed, port).handle, listeners)

    try:
        trio.run(main)
    except KeyboardInterrupt:
        return


# -- the farm: PostgreSQL, coordinator, worker -----------------------------------------

@dataclass
class Sample:
    t: float
    rss_mb: float
    urls: int
    cpu_s: float


class Sampler(threading.Thread):
    """Every ``every`` seconds: the worker tree's RSS and its URLs done (from /metrics)."""

    def __init__(self, pid: int, metrics_url: str, every: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.metrics_url = metrics_url
        self.every = every
        self.samples: list[Sample] = []
        self.done = threading.Event()

    def run(self) -> None:
        import psutil

        from bench.bench_worker import _tree_rss

        root = psutil.Process(self.pid)
        start = time.monotonic()
        while not self.done.wait(self.every):
            urls = urls_done(scrape(self.metrics_url))
            if urls is None:
                continue
            try:
                times = root.cpu_times()
            except psutil.NoSuchProcess:
                return
            self.samples.append(Sample(time.monotonic() - start,
                                       _tree_rss(root) / 1024 / 1024, urls,
                                       times.user + times.system))


def scrape(url: str) -> str:
    import httpx

    try:
        return httpx.get(url, timeout=5).text
    except httpx.HTTPError:
        return ""


def urls_done(metrics: str) -> int | None:
    found = re.search(r"^pairfarm_worker_fetch_duration_seconds_count (\S+)$", metrics, re.M)
    return None if found is None else int(float(found.group(1)))


def outcomes(metrics: str) -> dict[str, int]:
    pattern = r'^pairfarm_worker_url_outcomes_total\{outcome="([^"]+)"\} (\S+)$'
    counts = {m.group(1): int(float(m.group(2))) for m in re.finditer(pattern, metrics, re.M)}
    return {k: v for k, v in sorted(counts.items(), key=lambda kv: -kv[1]) if v}


def slope_per_10k(samples: list[Sample]) -> float | None:
    """Least-squares slope of RSS (MB) against URLs done, per 10,000 URLs."""
    xs, ys = [s.urls for s in samples], [s.rss_mb for s in samples]
    if len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    return sxy / sxx * 10_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(*args: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-m", "pairfarm", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"pairfarm {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def url_list(path: Path, count: int, hosts: int, port: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    urls = [f"http://127.0.0.{n % hosts + 1}:{port}/s/{n}.jpg" for n in range(count)]
    pq.write_table(pa.table({"url": urls, "caption": [f"soak image {n}" for n in range(count)]}),
                   path)


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    sys.exit(f"{url} did not answer in 120 s:\n{log.read_text()[-3000:]}")


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Result:
    samples: list[Sample]
    metrics: str
    seconds: float
    warmup: float

    def report(self) -> str:
        after = [s for s in self.samples if s.t >= self.warmup]
        last = self.samples[-1] if self.samples else Sample(0, 0, 0, 0)
        first = after[0] if after else last
        growth = slope_per_10k(after)
        rate = (last.urls - first.urls) / max(last.t - first.t, 1e-9)
        lines = [
            f"at {commit()}; {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
            f"{self.seconds / 60:.1f} min, {len(self.samples)} samples, {last.urls:,} URLs "
            f"({last.urls / max(last.t, 1e-9):.1f} URLs/s overall, {rate:.1f} after warm-up)",
            f"peak RSS {max((s.rss_mb for s in self.samples), default=0):.0f} MB; RSS after "
            f"warm-up {first.rss_mb:.0f} -> {last.rss_mb:.0f} MB",
            "RSS growth per 10k URLs (least squares over the samples after "
            f"{self.warmup:.0f} s): " + ("n/a" if growth is None else f"{growth:+.1f} MB"),
            f"worker CPU {last.cpu_s:.0f} s ({last.urls / max(last.cpu_s, 1e-9):.1f} URLs per "
            "CPU-second)",
            f"outcomes: {outcomes(self.metrics)}",
        ]
        return "\n".join(lines)


def commit() -> str:
    """The commit the run is at, and whether the tree differs from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                          capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=REPO, capture_output=True, text=True, check=False).stdout
    return f"commit {head or '?'}" + (" (with uncommitted changes)" if dirty.strip() else "")


def run(args: argparse.Namespace) -> Result:
    from coordinator.db import ensure_database
    from coordinator.embedded_pg import THROWAWAY_SETTINGS, EmbeddedPostgres
    from coordinator.migrate import upgrade

    work = Path(tempfile.mkdtemp(prefix="pairfarm-soak-"))
    pg = EmbeddedPostgres(work / "pg", settings=THROWAWAY_SETTINGS)
    server = pg.start()
    procs: list[subprocess.Popen[bytes]] = []
    hostile = subprocess.Popen([sys.executable, "-m", "bench.soak", "--serve", "--hosts",
                                str(args.hosts), "--pool-dir", str(args.pool_dir)],
                               stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert hostile.stdout is not None
        ready = hostile.stdout.readline()
        if not ready.startswith("READY"):
            sys.exit(f"hostile server did not start: {ready!r}")
        web_port = int(ready.split()[1])
        ensure_database(server.url(), "soak")
        db_url = server.url("soak")
        upgrade(db_url)
        env = {**os.environ, "PYTHONPATH": str(REPO), "DATABASE_URL": db_url}
        listing = work / "urls.parquet"
        url_list(listing, args.urls, args.hosts, web_port)
        cli("ingest", str(listing), env=env)
        token = cli("token", "create", "--role", "worker", "--name", "soak", env=env).strip()
        port, metrics_port = free_port(), free_port()
        coordinator = start([sys.executable, "-m", "pairfarm", "coordinator", "--port",
                             str(port), "--batch-size", str(args.batch_size)], env,
                            work / "coordinator.log")
        procs.append(coordinator)
        wait_healthy(f"http://127.0.0.1:{port}/healthz", coordinator, work / "coordinator.log")
        worker = start([sys.executable, "-m", "pairfarm", "worker", "--coordinator",
                        f"http://127.0.0.1:{port}", "--token", token, "-o",
                        str(work / "shards"), "--allow-cidr", "127.0.0.0/8", "--no-progress",
                        "--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1",
                        "--drain-timeout", "30", *args.worker_arg], env, work / "worker.log")
        procs.append(worker)
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        wait_healthy(metrics_url, worker, work / "worker.log")
        sampler = Sampler(worker.pid, metrics_url)
        began = time.monotonic()
        sampler.start()
        while time.monotonic() - began < args.minutes * 60:
            if worker.poll() is not None:
                print(f"worker exited {worker.returncode}:\n"
                      f"{(work / 'worker.log').read_text()[-3000:]}", file=sys.stderr)
                break
            time.sleep(1)
        metrics = scrape(metrics_url)
        sampler.done.set()
        sampler.join()
        return Result(sampler.samples, metrics, time.monotonic() - began, args.warmup)
    finally:
        for proc in reversed(procs):
            stop(proc)
        stop(hostile, 10)
        pg.stop()
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=60.0,
                        help="seconds left out of the RSS fit")
    parser.add_argument("--urls", type=int, default=None,
                        help="candidates to ingest (default: 300 per second of the run)")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--hosts", type=int, default=16)
    parser.add_argument("--pool-dir", type=Path, default=Path("bench/out/pool"))
    parser.add_argument("--csv", type=Path, default=None, help="write the samples here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--worker-arg", action="append", default=[],
                        help="one more argument for pairfarm worker (repeatable)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.serve:
        serve(args.hosts, args.pool_dir, args.seed)
        return
    args.urls = args.urls or int(args.minutes * 60 * 300)
    result = run(args)
    if args.csv:
        args.csv.write_text("t_s,rss_mb,urls,cpu_s\n" + "".join(
            f"{s.t:.1f},{s.rss_mb:.1f},{s.urls},{s.cpu_s:.1f}\n" for s in result.samples))
    print(result.report())


if __name__ == "__main__":
    main()
