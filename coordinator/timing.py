"""``Server-Timing`` on every response (W3C Server Timing): how long the app took.

``ServerTiming`` is ASGI middleware. It adds ``Server-Timing: app;dur=<ms>``, the
milliseconds from the moment the request, body read, reached it to the moment the
response started: the wait for a thread of the pool and a database connection, and the
handler itself. A client that subtracts it from its own round trip learns how long the
request spent outside the app (its own event loop, the network, the server's event loop
accepting and parsing). Browsers show the header in their developer tools;
``bench/simulator.py`` reports it per call.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Scope]]
Send = Callable[[Scope], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
HEADER = b"server-timing"


def header_value(seconds: float) -> bytes:
    return f"app;dur={seconds * 1000:.2f}".encode()


def app_seconds(value: str | None) -> float | None:
    """The ``app`` duration in seconds from a ``Server-Timing`` value; None without it."""
    for metric in (value or "").split(","):
        name, *params = (p.strip() for p in metric.split(";"))
        if name != "app":
            continue
        for param in params:
            key, _, dur = param.partition("=")
            if key == "dur":
                try:
                    return float(dur) / 1000
                except ValueError:
                    return None
    return None


class ServerTiming:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()

        async def timed(message: Scope) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((HEADER, header_value(time.perf_counter() - start)))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, timed)
