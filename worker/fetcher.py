"""Fetch one candidate URL: redirects, retries, politeness, opt-out, capped body.

``Fetcher.fetch(url)`` returns the decoded body of the final response or raises a
``FetchFailure`` naming the outcome. Two allowances bound one URL (``_Clock``):

- its network time, every redirect hop and retry included, runs under one deadline, so
  a server dripping a byte a second cannot hold a slot; connect and read timeouts apply
  to each network step;
- the time it waits for a slot of its host (other URLs of that host in flight, or the
  host's backoff window) stops that deadline and has its own bound,
  ``host_queue_timeout``: hundreds of URLs of one CDN queued behind a slow one end
  ``host_busy`` at worst, never ``timeout`` without having been requested.

What is refused before the body: an opt-out in the headers (``X-Robots-Tag`` with one
of ``disallowed_directives``, ``tdm-reservation: 1``) and a declared length over the
cap. What the body is, is decided on its bytes, not on its Content-Type
(``worker.sniff``): once its first decoded bytes are in, a body that no allowed image
decoder accepts (HTML, text, ...) ends ``not_image`` without being read further, and an
image served as ``text/html`` or ``application/octet-stream`` is kept.

Redirects are followed here, not by httpx: at most ``max_redirects`` hops, a loop is
caught as soon as a URL repeats, and every hop's target goes through the SSRF guard
again (numeric hosts here, resolved addresses in ``worker.network``).

Resource handling: the response is streamed and closed on every path (``async with``).
Every body is counted in a ``BodyBudget`` (``body_memory_bytes``) before its first byte
is read: its declared length, or, without one, a start that grows to the cap one body at
a time. The ``Fetched`` body keeps its reservation until ``release()`` (the decode stage
calls it when the body is decoded). Waiting for the budget stops the deadline: it is
this worker's memory, not the URL's network time.

Error handling: httpx and decoder errors are mapped to outcomes in ``_failure_for``;
``trio.Cancelled`` is never caught.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import trio

from pairfarm.outcomes import Outcome
from worker.addresses import parse_numeric_host
from worker.backoff import parse_retry_after
from worker.budget import BodyBudget, Reservation
from worker.decoding import BodyTooLarge, CappedBody, DecodeFailure, decoder_for
from worker.errors import FetchFailure
from worker.hosts import HostGate
from worker.metrics import WorkerMetrics, build_metrics
from worker.robots import opt_out_directive, tdm_reserved
from worker.settings import SAFE_FORMATS, FetchSettings
from worker.sniff import SNIFF_BYTES, image_format, what_it_is
from worker.transport import FetchClient, raw_chunks

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_RETRYABLE = {429: Outcome.HTTP_429, 503: Outcome.HTTP_5XX}


@dataclass(frozen=True, slots=True)
class Fetched:
    url: str
    body: bytes
    content_type: str
    wire_bytes: int
    held: Reservation

    def release(self) -> None:
        """The body's bytes given back to the budget (idempotent)."""
        self.held.release()


@dataclass(frozen=True, slots=True)
class _Redirect:
    target: str


@dataclass(frozen=True, slots=True)
class _RetryLater:
    outcome: Outcome
    delay: float | None
    detail: str


class _Clock:
    """One URL's allowances: network seconds (the deadline scope) and queueing seconds.

    ``queueing()`` stops the deadline while the block runs and charges the time to the
    queue allowance instead; ``queue_until()`` is when that allowance runs out.
    """

    def __init__(self, scope: trio.CancelScope, queue_s: float) -> None:
        self._scope = scope
        self._queue_left = queue_s

    def queue_until(self) -> float:
        return trio.current_time() + self._queue_left

    @contextmanager
    def queueing(self) -> Iterator[None]:
        start = trio.current_time()
        try:
            with self.stopped():
                yield
        finally:
            self._queue_left -= trio.current_time() - start

    @contextmanager
    def stopped(self) -> Iterator[None]:
        """The deadline stopped while the block runs (a wait for this worker's memory)."""
        network_left = self._scope.deadline - trio.current_time()
        self._scope.deadline = math.inf
        try:
            yield
        finally:
            self._scope.deadline = trio.current_time() + network_left


class Fetcher:
    """Fetches candidate URLs with a shared client, host gate and large-body slots.

    ``formats`` are the image formats the decoder opens (``ImageSettings.formats``): a
    body none of them accepts is refused after its first bytes."""

    def __init__(self, settings: FetchSettings, client: FetchClient,
                 gate: HostGate, metrics: WorkerMetrics | None = None,
                 formats: Sequence[str] = SAFE_FORMATS) -> None:
        self._s = settings
        self._formats = tuple(formats)
        self._client = client
        self._gate = gate
        self._bodies = BodyBudget(settings.body_memory_bytes, settings.max_body_bytes,
                                  settings.concurrency)
        self._metrics = metrics or build_metrics()
        self.wire_bytes = 0

    async def fetch(self, url: str) -> Fetched:
        """The body at ``url``; in flight and timed in the metrics, failures included."""
        with self._metrics.fetching():
            return await self._fetch_within_deadline(url)

    async def _fetch_within_deadline(self, url: str) -> Fetched:
        with trio.move_on_after(self._s.deadline) as scope:
            return await self._follow(url, _Clock(scope, self._s.host_queue_timeout))
        raise FetchFailure(Outcome.TIMEOUT,
                           f"deadline of {self._s.deadline:g}s of network time passed")

    async def _follow(self, url: str, clock: _Clock) -> Fetched:
        seen: set[str] = set()
        target = url
        for _hop in range(self._s.max_redirects + 1):
            host = self._check_target(target)
            seen.add(target)
            result = await self._with_retries(target, host, clock)
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

    async def _with_retries(self, url: str, host: str, clock: _Clock) -> Fetched | _Redirect:
        attempt = 0
        last: _RetryLater | None = None
        while True:
            result = await self._retry(url, host, clock, last)
            if not isinstance(result, _RetryLater):
                self._gate.recovered(host)
                return result
            delay = self._gate.back_off(host, result.delay, result.outcome)
            if attempt == self._s.max_retries or delay > self._s.max_retry_wait:
                raise FetchFailure(result.outcome, f"{result.detail} after {attempt} retries")
            attempt += 1
            last = result

    async def _retry(self, url: str, host: str, clock: _Clock,
                     last: _RetryLater | None) -> Fetched | _Redirect | _RetryLater:
        """One more hop; a retry that gets no slot in time ends in its own last answer."""
        try:
            return await self._hop(url, host, clock)
        except FetchFailure as exc:
            if last is None or exc.outcome is not Outcome.HOST_BUSY:
                raise
            raise FetchFailure(last.outcome, f"{last.detail}, then {exc.detail}") from exc

    @asynccontextmanager
    async def _slot(self, host: str, clock: _Clock) -> AsyncIterator[None]:
        """A slot of ``host``; the wait counts against the queue bound, not the deadline."""
        async with AsyncExitStack() as stack:
            with clock.queueing():
                await stack.enter_async_context(self._gate.slot(host, clock.queue_until()))
            yield

    async def _hop(self, url: str, host: str, clock: _Clock
                   ) -> Fetched | _Redirect | _RetryLater:
        try:
            async with self._slot(host, clock), self._client.stream(url) as response:
                return await self._handle(response, clock)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise _failure_for(exc) from exc
        except (BodyTooLarge, DecodeFailure) as exc:
            outcome = Outcome.TOO_LARGE if isinstance(exc, BodyTooLarge) else Outcome.NOT_IMAGE
            raise FetchFailure(outcome, str(exc)) from exc

    async def _handle(self, response: httpx.Response, clock: _Clock
                      ) -> Fetched | _Redirect | _RetryLater:
        status = response.status_code
        if status in _REDIRECTS:
            return _redirect(response)
        if status in _RETRYABLE:
            delay = parse_retry_after(response.headers.get("retry-after"))
            return _RetryLater(_RETRYABLE[status], delay, f"HTTP {status}")
        _raise_for_status(status)
        self._check_headers(response)
        return await self._read(response, clock)

    def _check_headers(self, response: httpx.Response) -> None:
        """What the headers prove: an opt-out, a declared length over the cap. The
        Content-Type proves nothing (the body's first bytes decide, ``_check_head``)."""
        if self._s.respect_opt_out:
            self._check_opt_out(response.headers)
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > self._s.max_body_bytes:
            raise FetchFailure(Outcome.TOO_LARGE, f"Content-Length {length}")

    def _check_opt_out(self, headers: httpx.Headers) -> None:
        found = opt_out_directive(headers.get_list("x-robots-tag"), self._s.agent_token,
                                  self._s.disallowed_directives)
        if found is not None:
            raise FetchFailure(Outcome.OPTED_OUT, f"X-Robots-Tag: {found}")
        if self._s.tdm_reservation and tdm_reserved(headers.get_list("tdm-reservation")):
            raise FetchFailure(Outcome.OPTED_OUT, "tdm-reservation: 1")

    def _check_head(self, body: CappedBody, response: httpx.Response) -> None:
        """``not_image`` unless an allowed image decoder accepts the body's first bytes."""
        if image_format(body.head, self._formats) is None:
            content_type = response.headers.get("content-type", "")[:100] or "none"
            raise FetchFailure(Outcome.NOT_IMAGE, f"{what_it_is(body.head)}, not an image "
                                                  f"(Content-Type: {content_type})")

    async def _read(self, response: httpx.Response, clock: _Clock) -> Fetched:
        """The body, counted in the body budget from before its first byte."""
        coding = response.headers.get("content-encoding", "")
        body = CappedBody(decoder_for(coding), self._s.max_body_bytes, SNIFF_BYTES)
        length = _declared_length(response, coding)
        with clock.stopped():
            held = await self._bodies.reserve(length)
        try:
            data = await self._read_within(response, body, _Growth(held, length), clock)
        except BaseException:
            held.release()
            raise
        held.shrink_to(len(data))
        return Fetched(url=str(response.url), body=data, wire_bytes=body.raw_size,
                       content_type=response.headers.get("content-type", ""), held=held)

    async def _read_within(self, response: httpx.Response, body: CappedBody,
                           growth: _Growth, clock: _Clock) -> bytes:
        """Chunks fed to ``body``; the reservation grows first when they would pass it.
        Its first ``SNIFF_BYTES`` are checked as soon as they are in (a shorter body,
        once it ends; an empty one goes on to the image checks: ``too_small``).

        A content-coded chunk may decode to much more than its size, so such a body
        takes the cap before it reads anything."""
        if not _identity(response.headers.get("content-encoding", "")):
            await self._grow(growth, clock)
        sniffed = False
        async for raw in raw_chunks(response):
            self.wire_bytes += len(raw)
            self._metrics.add_bytes(len(raw))
            if growth.short_of(body.size + len(raw), self._s.max_body_bytes):
                await self._grow(growth, clock)
            body.feed(raw)
            if not sniffed and len(body.head) >= SNIFF_BYTES:
                self._check_head(body, response)
                sniffed = True
        data = body.finish()
        if not sniffed and data:
            self._check_head(body, response)
        return data

    async def _grow(self, growth: _Growth, clock: _Clock) -> None:
        with clock.stopped():
            await self._bodies.grow(growth.held, growth.length)


@dataclass(frozen=True, slots=True)
class _Growth:
    """A body's reservation and the length it grows to (``None``: the cap)."""

    held: Reservation
    length: int | None

    def short_of(self, size: int, cap: int) -> bool:
        """Whether ``size`` bytes need more than is held, and it may still grow (a body
        already at its length or the cap waits for nothing: past it, it fails)."""
        target = cap if self.length is None else min(self.length, cap)
        return self.held.size < min(size, target)


def _identity(coding: str) -> bool:
    return coding.strip().lower() in ("", "identity")


def _declared_length(response: httpx.Response, coding: str) -> int | None:
    """The body's size from Content-Length, when it is not content-coded."""
    length = response.headers.get("content-length", "")
    return int(length) if length.isdigit() and _identity(coding) else None


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
