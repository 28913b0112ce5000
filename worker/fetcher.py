"""Fetch one candidate URL: redirects, retries, politeness, opt-out, capped body.

``Fetcher.fetch(url)`` returns the decoded body of the final response or raises a
``FetchFailure`` naming the outcome. The whole fetch, every redirect hop and retry
included, runs under one total deadline, so a server dripping a byte a second cannot
hold a slot; connect and read timeouts apply to each network step.

Redirects are followed here, not by httpx: at most ``max_redirects`` hops, a loop is
caught as soon as a URL repeats, and every hop's target goes through the SSRF guard
again (numeric hosts here, resolved addresses in ``worker.network``).

Resource handling: the response is streamed and closed on every path (``async with``);
bodies above ``large_body_bytes`` hold one of ``large_body_slots`` so that only a few
large bodies are in memory at once.

Error handling: httpx and decoder errors are mapped to outcomes in ``_failure_for``;
``trio.Cancelled`` is never caught.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import trio

from pairfarm.outcomes import Outcome
from worker.addresses import parse_numeric_host
from worker.backoff import parse_retry_after
from worker.decoding import BodyTooLarge, CappedBody, DecodeFailure, decoder_for
from worker.errors import FetchFailure
from worker.hosts import HostGate
from worker.metrics import WorkerMetrics, build_metrics
from worker.robots import opt_out_directive
from worker.settings import FetchSettings
from worker.transport import FetchClient, raw_chunks

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_RETRYABLE = {429: Outcome.HTTP_429, 503: Outcome.HTTP_5XX}


@dataclass(frozen=True, slots=True)
class Fetched:
    url: str
    body: bytes
    content_type: str
    wire_bytes: int


@dataclass(frozen=True, slots=True)
class _Redirect:
    target: str


@dataclass(frozen=True, slots=True)
class _RetryLater:
    outcome: Outcome
    delay: float | None
    detail: str


class Fetcher:
    """Fetches candidate URLs with a shared client, host gate and large-body slots."""

    def __init__(self, settings: FetchSettings, client: FetchClient,
                 gate: HostGate, metrics: WorkerMetrics | None = None) -> None:
        self._s = settings
        self._client = client
        self._gate = gate
        self._large = trio.CapacityLimiter(settings.large_body_slots)
        self._metrics = metrics or build_metrics()
        self.wire_bytes = 0

    async def fetch(self, url: str) -> Fetched:
        """The body at ``url``; in flight and timed in the metrics, failures included."""
        with self._metrics.fetching():
            return await self._fetch_within_deadline(url)

    async def _fetch_within_deadline(self, url: str) -> Fetched:
        with trio.move_on_after(self._s.deadline):
            return await self._follow(url)
        raise FetchFailure(Outcome.TIMEOUT, f"total deadline of {self._s.deadline:g}s passed")

    async def _follow(self, url: str) -> Fetched:
        seen: set[str] = set()
        target = url
        for _hop in range(self._s.max_redirects + 1):
            host = self._check_target(target)
            seen.add(target)
            result = await self._with_retries(target, host)
            if isinstance(result, Fetched):
                return result
            target = result.target
            if target in seen:
                raise FetchFailure(Outcome.REDIRECT_LIMIT, f"redirect loop at {target}")
        raise FetchFailure(Outcome.REDIRECT_LIMIT, f"more than {self._s.max_redirects} redirects")

    def _check_target(self, url: str) -> str:
        """The URL's host name, once the URL is http(s) and a numeric host is allowed."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchFailure(Outcome.INVALID_URL, f"not an http(s) URL: {url[:200]}")
        literal = parse_numeric_host(parts.hostname)
        if literal is not None:
            self._s.policy.check(literal, parts.hostname)
        return parts.hostname

    async def _with_retries(self, url: str, host: str) -> Fetched | _Redirect:
        attempt = 0
        while True:
            result = await self._hop(url, host)
            if not isinstance(result, _RetryLater):
                self._gate.recovered(host)
                return result
            delay = self._gate.back_off(host, result.delay, result.outcome)
            if attempt == self._s.max_retries or delay > self._s.max_retry_wait:
                raise FetchFailure(result.outcome, f"{result.detail} after {attempt} retries")
            attempt += 1

    async def _hop(self, url: str, host: str) -> Fetched | _Redirect | _RetryLater:
        try:
            async with self._gate.slot(host), self._client.stream(url) as response:
                return await self._handle(response)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise _failure_for(exc) from exc
        except (BodyTooLarge, DecodeFailure) as exc:
            outcome = Outcome.TOO_LARGE if isinstance(exc, BodyTooLarge) else Outcome.NOT_IMAGE
            raise FetchFailure(outcome, str(exc)) from exc

    async def _handle(self, response: httpx.Response) -> Fetched | _Redirect | _RetryLater:
        status = response.status_code
        if status in _REDIRECTS:
            return _redirect(response)
        if status in _RETRYABLE:
            delay = parse_retry_after(response.headers.get("retry-after"))
            return _RetryLater(_RETRYABLE[status], delay, f"HTTP {status}")
        _raise_for_status(status)
        self._check_headers(response)
        return await self._read(response)

    def _check_headers(self, response: httpx.Response) -> None:
        if self._s.respect_opt_out:
            found = opt_out_directive(response.headers.get_list("x-robots-tag"),
                                      self._s.agent_token)
            if found is not None:
                raise FetchFailure(Outcome.OPTED_OUT, f"X-Robots-Tag: {found}")
        content_type = response.headers.get("content-type", "").lower()
        if content_type.startswith("text/"):
            raise FetchFailure(Outcome.NOT_IMAGE, f"Content-Type {content_type[:100]}")
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > self._s.max_body_bytes:
            raise FetchFailure(Outcome.TOO_LARGE, f"Content-Length {length}")

    async def _read(self, response: httpx.Response) -> Fetched:
        body = CappedBody(decoder_for(response.headers.get("content-encoding", "")),
                          self._s.max_body_bytes)
        holding_large = False
        async with AsyncExitStack() as stack:
            async for raw in raw_chunks(response):
                self.wire_bytes += len(raw)
                self._metrics.add_bytes(len(raw))
                body.feed(raw)
                if body.size > self._s.large_body_bytes and not holding_large:
                    await stack.enter_async_context(self._large)
                    holding_large = True
            data = body.finish()
        return Fetched(url=str(response.url), body=data, wire_bytes=body.raw_size,
                       content_type=response.headers.get("content-type", ""))


def _redirect(response: httpx.Response) -> _Redirect:
    location = response.headers.get("location")
    if not location:
        raise FetchFailure(Outcome.INVALID_URL, f"HTTP {response.status_code} without Location")
    try:
        return _Redirect(str(response.url.join(location)))
    except httpx.InvalidURL as exc:
        raise FetchFailure(Outcome.INVALID_URL, f"bad Location: {location[:200]}") from exc


def _raise_for_status(status: int) -> None:
    if 200 <= status < 300:
        return
    if 400 <= status < 500:
        raise FetchFailure(Outcome.HTTP_4XX, f"HTTP {status}")
    if status >= 500:
        raise FetchFailure(Outcome.HTTP_5XX, f"HTTP {status}")
    raise FetchFailure(Outcome.INVALID_URL, f"unexpected HTTP {status}")


def _failure_for(exc: httpx.HTTPError | httpx.InvalidURL) -> FetchFailure:
    """The outcome of an httpx error (the edge where httpx's tree meets ours)."""
    if isinstance(exc, httpx.TimeoutException):
        return FetchFailure(Outcome.TIMEOUT, f"{type(exc).__name__}: {exc}")
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return FetchFailure(Outcome.INVALID_URL, str(exc))
    return FetchFailure(Outcome.CONNECT, f"{type(exc).__name__}: {exc}")
