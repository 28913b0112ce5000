"""The demo's image server: synthetic captioned pictures with a realistic mix of trouble.

``DemoPlan`` decides, from a seed alone, what URL ``n`` does; ``DemoServer`` serves that
plan on loopback, one listener per host address (127.0.0.1, 127.0.0.2, ... count as
distinct hosts for the worker's per-host limits). Every answer waits ``delay`` seconds
(20-200 ms by default) first.

Kinds (share of URLs):
  match       a coloured shape whose caption describes it           -> ok, kept by CLIP
  mismatch    a coloured shape with a caption that does not fit     -> ok, dropped by CLIP
  other_bot   a shape whose X-Robots-Tag opts out another agent only -> ok
  not_found   404                                                    -> http_4xx
  error       500                                                    -> http_5xx
  opt_out     X-Robots-Tag: noai                                     -> opted_out
  bomb        a PNG header declaring 30000 x 30000 pixels           -> bomb
  html        an HTML page served as image/jpeg                      -> not_image
  tiny        a 2 KB image (under LAION's 5 KB floor)                -> too_small
  reset       the connection is closed before any answer            -> connect

``AnswerGate`` lets a test hold the farm's progress: every request waits at the gate until
it is open or the test lets a counted number of answers through (``allow``), so a fault
drill lands while batches are in flight on a fast machine as on a slow one.

Resource handling: ``start()`` runs one thread per listener; ``stop()`` opens the gate
(held requests are answered), shuts the listeners down and closes the sockets.
"""

from __future__ import annotations

import io
import random
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

from localfarm import synthetic
from pairfarm.outcomes import Outcome

KINDS: tuple[tuple[str, float, Outcome], ...] = (
    ("match", 0.60, Outcome.OK),
    ("mismatch", 0.14, Outcome.OK),
    ("other_bot", 0.02, Outcome.OK),
    ("not_found", 0.05, Outcome.HTTP_4XX),
    ("error", 0.04, Outcome.HTTP_5XX),
    ("opt_out", 0.03, Outcome.OPTED_OUT),
    ("bomb", 0.03, Outcome.BOMB),
    ("html", 0.03, Outcome.NOT_IMAGE),
    ("tiny", 0.03, Outcome.TOO_SMALL),
    ("reset", 0.03, Outcome.CONNECT),
)
EXPECTED: dict[str, Outcome] = {name: outcome for name, _, outcome in KINDS}
SERVED_SIZE = 256


@dataclass(frozen=True)
class Item:
    n: int
    kind: str
    caption: str
    seed: int


class DemoPlan:
    """What every URL of the demo does, from ``seed`` alone."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def item(self, n: int) -> Item:
        rng = random.Random(self.seed * 1_000_003 + n)
        roll, kind = rng.random(), KINDS[-1][0]
        for name, share, _ in KINDS:
            if roll < share:
                kind = name
                break
            roll -= share
        sample = self._sample(n, kind)
        return Item(n=n, kind=kind, caption=sample.caption, seed=rng.randrange(2**31))

    def _sample(self, n: int, kind: str) -> synthetic.Sample:
        rng = np.random.default_rng([self.seed, n])
        return synthetic.mismatched(rng) if kind == "mismatch" else synthetic.matched(rng)

    def picture(self, n: int) -> bytes:
        """The JPEG served for URL ``n``: its shape upscaled, with a little grain."""
        rng = np.random.default_rng([self.seed, n])
        image = self._sample(n, self.item(n).kind).image
        big = image.resize((SERVED_SIZE, SERVED_SIZE), Image.Resampling.BICUBIC)
        grain = rng.integers(-6, 7, size=(SERVED_SIZE, SERVED_SIZE, 3))
        pixels = np.clip(np.asarray(big).astype(np.int16) + grain, 0, 255).astype(np.uint8)
        return synthetic.jpeg_bytes(Image.fromarray(pixels), quality=90)


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` (its data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    # 16 KB of incompressible data: over the 5 KB floor, so only the pixel cap can stop it
    filler = random.Random(0).randbytes(16 * 1024)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(filler)) + chunk(b"IEND", b""))


def tiny_jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(out, "JPEG", quality=50)
    return out.getvalue()


class AnswerGate:
    """Which answers the server may give: all (open), none (closed), or ``allow(n)`` more.

    ``passed`` counts the requests let through, ``requested`` them by URL number;
    ``waiting`` counts those held right now.
    """

    def __init__(self, *, is_open: bool = True) -> None:
        self._cond = threading.Condition()
        self._open = is_open
        self._allowance = 0
        self.passed = 0
        self.waiting = 0
        self.requested: Counter[int] = Counter()

    @property
    def allowance(self) -> int:
        with self._cond:
            return self._allowance

    def open(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._open = False
            self._allowance = 0

    def allow(self, n: int) -> None:
        """Let ``n`` more requests through while closed."""
        with self._cond:
            self._allowance += n
            self._cond.notify_all()

    def pass_through(self, n: int) -> None:
        """Block the request for URL ``n`` until the gate lets it through."""
        with self._cond:
            self.waiting += 1
            self._cond.wait_for(lambda: self._open or self._allowance > 0)
            self.waiting -= 1
            if not self._open:
                self._allowance -= 1
            self.passed += 1
            self.requested[n] += 1


class _Handler(BaseHTTPRequestHandler):
    plan: DemoPlan
    delay: tuple[float, float]
    gate: AnswerGate
    server_version = "pairfarm-demo/1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        return

    def do_GET(self) -> None:
        try:
            n = int(self.path.rsplit("/", 1)[-1].split(".")[0])
        except ValueError:
            self._send(404, b"no such picture", "text/plain")
            return
        self.gate.pass_through(n)
        item = self.plan.item(n)
        time.sleep(random.Random(item.seed).uniform(*self.delay))
        self._answer(item)

    def _answer(self, item: Item) -> None:
        kind = item.kind
        if kind == "reset":
            self.close_connection = True
            self.connection.close()
        elif kind == "not_found":
            self._send(404, b"gone", "text/plain")
        elif kind == "error":
            self._send(500, b"upstream failed", "text/plain")
        elif kind == "bomb":
            self._send(200, bomb_png(), "image/png")
        elif kind == "html":
            self._send(200, b"<html><body>" + b"not a picture " * 600 + b"</body></html>",
                       "image/jpeg")
        elif kind == "tiny":
            self._send(200, tiny_jpeg(), "image/jpeg")
        else:
            robots = {"opt_out": "noai, noimageai", "other_bot": "otherbot: noai"}.get(kind)
            self._send(200, self.plan.picture(item.n), "image/jpeg", robots)

    def _send(self, status: int, body: bytes, content_type: str,
              robots: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if robots:
            self.send_header("X-Robots-Tag", robots)
        self.end_headers()
        self.wfile.write(body)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that hangs up (a worker killed mid-request) is not an error here."""
        exc = sys.exc_info()[1]
        if not isinstance(exc, ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class DemoServer:
    """The plan served on ``hosts`` loopback addresses, all on one port, behind ``gate``
    (open by default)."""

    def __init__(self, plan: DemoPlan, *, hosts: int = 8, port: int = 0,
                 delay: tuple[float, float] = (0.02, 0.2),
                 gate: AnswerGate | None = None) -> None:
        self.plan = plan
        self.gate = gate or AnswerGate()
        handler = type("DemoHandler", (_Handler,),
                       {"plan": plan, "delay": delay, "gate": self.gate})
        first = _QuietServer(("127.0.0.1", port), handler)
        self.port = int(first.server_address[1])
        self.servers = [first] + [_QuietServer((f"127.0.0.{h}", self.port), handler)
                                  for h in range(2, hosts + 1)]
        self._threads: list[threading.Thread] = []

    def url(self, n: int) -> str:
        host = f"127.0.0.{n % len(self.servers) + 1}"
        return f"http://{host}:{self.port}/img/{n}.jpg"

    def start(self) -> DemoServer:
        for server in self.servers:
            thread = threading.Thread(target=server.serve_forever, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self.gate.open()
        for server in self.servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(5)
