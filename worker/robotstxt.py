"""robots.txt (RFC 9309): an origin's rules decide whether its URLs are fetched at all.

Before a candidate URL is requested, ``RobotsCache.check`` finds the robots.txt answer of
its origin (``scheme://host[:port]``): in this process's cache, else in the farm's
(``SharedRobots``: the coordinator, ``coordinator.robots``), else by fetching
``/robots.txt`` itself (``RobotsFetcher``), then shares what it found. So each origin's
file is fetched about once per farm per TTL, not once per worker: a batch's origins are
looked up in one request when it starts (``prepare``), fetched answers are shared in
groups (``flush``). Concurrent URLs of one origin wait for one fetch.

The answer, by the last HTTP status (RFC 9309 section 2.3.1):

- 2xx: the rules (parsed by ``protego``), matched against the user-agent token
  (``--user-agent-token``, also the first product token of the User-Agent header): the
  group naming the token, else ``*``. A URL they disallow ends ``robots_disallowed``;
- 4xx, or more than ``max_redirects`` redirects ("unavailable"): every URL is allowed;
- 5xx and 429 ("unreachable"): every URL is disallowed for ``unreachable_ttl_s``, then
  the file is fetched again; the URL ends in that status's outcome (``http_5xx``,
  ``http_429``), its detail naming robots.txt, so it stays a transient failure;
- no answer at all (DNS, connect, SSRF guard, timeout): disallowed the same way, with
  the network outcome. Such an answer is this worker's view of the network and is kept
  locally only; the others are shared.

What is kept and shared of a 2xx body is its first ``max_bytes`` (500 KiB, RFC 9309's
minimum) without comments, blank lines and sitemap lines: the lines the parser reads.

Redirects of the candidate URL itself are not checked against their targets' robots.txt
(the fetcher follows them); the candidate's own origin decides.

Resource handling: the fetch goes through the stage's client (``worker.transport``:
guarded dialling, the configured User-Agent); its response is closed on every path. The
local cache holds at most ``max_origins`` answers (least recently used dropped).

Error handling: a failure to fetch robots.txt becomes an answer, never an exception; the
coordinator's errors (``pairfarm.client.ClientError``) are logged and the worker goes on
alone; ``trio.Cancelled`` is never caught.
"""

from __future__ import annotations

import logging
import re
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import httpx
import trio
from protego import Protego

from pairfarm.client import AsyncCoordinatorClient, ClientError
from pairfarm.outcomes import Outcome
from pairfarm.protocol import RobotsCached, RobotsEntry, RobotsKind
from worker.addresses import parse_numeric_host
from worker.decoding import DecodeFailure, decoder_for
from worker.errors import FetchFailure
from worker.settings import FetchSettings, RobotsSettings
from worker.transport import FetchClient, raw_chunks

log = logging.getLogger("pairfarm.worker")

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: what ``Protego.parse`` would drop anyway: comments, then surrounding blanks
_COMMENT = re.compile(r"#.*")
_SITEMAP = re.compile(r"^site-?maps?\s*:", re.IGNORECASE)
#: ``pairfarm.protocol.Origin``
_SHAREABLE_ORIGIN = re.compile(r"^https?://[a-z0-9._~%!$&'()*+,;=:\[\]-]+$")
#: answers fetched here before they are shared; and the longest they wait
SHARE_EVERY = 64
SHARE_INTERVAL_S = 2.0


def origin_of(url: str) -> str | None:
    """``scheme://host[:port]`` of an http(s) URL (the port only when not the default),
    or None when the URL cannot be parsed (the fetcher then names its outcome)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        return None
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        return None
    host = parsed.raw_host.decode("ascii", "replace")
    if ":" in host:
        host = f"[{host}]"
    port = f":{parsed.port}" if parsed.port is not None else ""
    return f"{parsed.scheme}://{host}{port}"


def rule_lines(text: str) -> str:
    """The lines of a robots.txt the parser reads: without comments, blank lines and
    sitemaps (site-wide, no part of any group); parsed, it means what ``text`` means."""
    lines = (_COMMENT.sub("", raw).strip() for raw in text.replace("\x00", "").splitlines())
    return "\n".join(line for line in lines if line and not _SITEMAP.match(line))


@dataclass(eq=False, kw_only=True)
class Answer:
    """One origin's robots.txt answer, valid until ``expires_at`` (Trio's clock)."""

    kind: RobotsKind
    status: int
    body: str = ""
    expires_at: float
    #: for a disallow-all answer: the failure each of the origin's URLs ends in
    failure: FetchFailure | None = None
    _rules: Protego | None = field(default=None, repr=False)

    def check(self, url: str, token: str) -> None:
        """Raise the ``FetchFailure`` the answer gives ``url``; return when allowed."""
        if self.kind is RobotsKind.ALLOW_ALL:
            return
        if self.kind is RobotsKind.DISALLOW_ALL:
            raise self.failure or _unreachable(self.status, "robots.txt")
        if self._rules is None:
            self._rules = Protego.parse(self.body)
        if not self._rules.can_fetch(url, token):
            raise FetchFailure(Outcome.ROBOTS_DISALLOWED,
                               f"robots.txt disallows it for {token!r}")


@dataclass(frozen=True, kw_only=True)
class Found:
    """What a robots.txt fetch found; ``shared`` answers go to the farm."""

    kind: RobotsKind
    status: int
    body: str = ""
    failure: FetchFailure | None = None

    @property
    def shared(self) -> bool:
        return self.status != 0


def _unreachable(status: int, what: str) -> FetchFailure:
    outcome = Outcome.HTTP_429 if status == 429 else Outcome.HTTP_5XX
    return FetchFailure(outcome, f"{what} answered HTTP {status}: everything disallowed "
                                 f"until it answers")


class RobotsFetcher:
    """Fetches one origin's robots.txt with the stage's client (the SSRF guard, the
    configured User-Agent), following up to ``max_redirects`` redirects, keeping the
    first ``max_bytes`` of the body; every failure becomes a ``Found``."""

    def __init__(self, settings: RobotsSettings, fetch: FetchSettings,
                 client: FetchClient) -> None:
        self._s = settings
        self._fetch = fetch
        self._client = client

    async def fetch(self, origin: str) -> Found:
        with trio.move_on_after(self._s.timeout_s):
            try:
                return await self._follow(f"{origin}/robots.txt")
            except FetchFailure as exc:
                return Found(kind=RobotsKind.DISALLOW_ALL, status=0, failure=FetchFailure(
                    exc.outcome, f"robots.txt of {origin}: {exc.detail}"))
        return Found(kind=RobotsKind.DISALLOW_ALL, status=0, failure=FetchFailure(
            Outcome.TIMEOUT, f"robots.txt of {origin}: no answer in {self._s.timeout_s:g}s"))

    async def _follow(self, url: str) -> Found:
        for _hop in range(self._s.max_redirects + 1):
            self._check_target(url)
            result = await self._get(url)
            if isinstance(result, Found):
                return result
            url = result
        return Found(kind=RobotsKind.ALLOW_ALL, status=310)

    def _check_target(self, url: str) -> None:
        parsed = httpx.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise FetchFailure(Outcome.INVALID_URL, f"redirected to {url[:200]}")
        literal = parse_numeric_host(parsed.host)
        if literal is not None:
            self._fetch.policy.check(literal, parsed.host)

    async def _get(self, url: str) -> Found | str:
        """The answer at ``url``, or the URL it redirects to."""
        try:
            async with self._client.stream(url) as response:
                return await self._answer(response)
        except httpx.TimeoutException as exc:
            raise FetchFailure(Outcome.TIMEOUT, f"{type(exc).__name__}: {exc}") from exc
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise FetchFailure(Outcome.CONNECT, f"{type(exc).__name__}: {exc}") from exc

    async def _answer(self, response: httpx.Response) -> Found | str:
        status = response.status_code
        location = response.headers.get("location")
        if status in _REDIRECTS and location:
            return str(response.url.join(location))
        if 200 <= status < 300:
            return await self._rules(response)
        if status == 429 or status >= 500:
            return Found(kind=RobotsKind.DISALLOW_ALL, status=status)
        return Found(kind=RobotsKind.ALLOW_ALL, status=status)

    async def _rules(self, response: httpx.Response) -> Found:
        try:
            body = await self._read(response)
        except DecodeFailure as exc:
            return Found(kind=RobotsKind.DISALLOW_ALL, status=0, failure=FetchFailure(
                Outcome.ROBOTS_DISALLOWED, f"robots.txt could not be decoded: {exc}"))
        text = rule_lines(body.decode("utf-8", "replace").removeprefix("\ufeff"))
        return Found(kind=RobotsKind.RULES, status=response.status_code, body=text)

    async def _read(self, response: httpx.Response) -> bytes:
        """The decoded body's first ``max_bytes`` (the rest is never read)."""
        decoder = decoder_for(response.headers.get("content-encoding", ""))
        parts: list[bytes] = []
        size = 0
        async for raw in raw_chunks(response):
            for part in decoder.feed(raw):
                parts.append(part)
                size += len(part)
            if size >= self._s.max_bytes:
                break
        else:
            parts.append(decoder.flush())
        return b"".join(parts)[:self._s.max_bytes]


class SharedRobots(Protocol):
    """The farm's robots.txt answers (the coordinator's ``/robots`` endpoints)."""

    async def lookup(self, origins: list[str]) -> list[RobotsCached]: ...

    async def store(self, entries: list[RobotsEntry]) -> None: ...


class CoordinatorRobots:
    """``SharedRobots`` through the coordinator's API; its errors are logged, never raised
    (a worker that cannot share fetches on its own)."""

    def __init__(self, client: AsyncCoordinatorClient) -> None:
        self._client = client

    async def lookup(self, origins: list[str]) -> list[RobotsCached]:
        try:
            return await self._client.robots_lookup(origins)
        except ClientError as exc:
            log.warning("robots.txt lookup at the coordinator failed: %s", exc)
            return []

    async def store(self, entries: list[RobotsEntry]) -> None:
        try:
            await self._client.robots_store(entries)
        except ClientError as exc:
            log.warning("sharing %d robots.txt answers failed: %s", len(entries), exc)


class RobotsCache:
    """This process's robots.txt answers, filled from the farm's or by fetching; see the
    module docstring. ``counts`` says where each origin's answer came from (``local``
    hits, ``shared`` from the coordinator, ``fetched`` here)."""

    def __init__(self, settings: RobotsSettings, token: str,
                 shared: SharedRobots | None = None) -> None:
        self._s = settings
        self._token = token
        self._shared = shared
        self._answers: OrderedDict[str, Answer] = OrderedDict()
        self._pending: dict[str, trio.Event] = {}
        self._unshared: list[RobotsEntry] = []
        self._sharing = False
        self._waiting_since = 0.0
        self.counts: Counter[str] = Counter()

    def bound(self, fetcher: RobotsFetcher) -> RobotsGuard:
        return RobotsGuard(self, fetcher)

    async def prepare(self, urls: Iterable[str]) -> None:
        """Look up, in one request, the farm's answers for the origins of ``urls`` that
        this process has no valid answer for."""
        if self._shared is None:
            return
        wanted = {o for o in map(origin_of, urls) if o is not None}
        missing = sorted(o for o in wanted if self._fresh(o) is None
                         and o not in self._pending and _SHAREABLE_ORIGIN.match(o))
        if missing:
            for cached in await self._shared.lookup(missing):
                self._put(cached.origin, Found(kind=cached.kind, status=cached.status,
                                               body=cached.body), cached.expires_in_s)
                self.counts["shared"] += 1

    async def check(self, url: str, fetcher: RobotsFetcher) -> None:
        """Return when ``url`` may be fetched; else raise the ``FetchFailure`` naming why."""
        origin = origin_of(url)
        if origin is None:
            return
        answer = self._fresh(origin)
        if answer is None:
            answer = await self._resolve(origin, fetcher)
        else:
            self.counts["local"] += 1
        answer.check(url, self._token)

    def _fresh(self, origin: str) -> Answer | None:
        answer = self._answers.get(origin)
        if answer is None or answer.expires_at <= trio.current_time():
            return None
        self._answers.move_to_end(origin)
        return answer

    async def _resolve(self, origin: str, fetcher: RobotsFetcher) -> Answer:
        """The origin's answer, fetched by one task while the others wait for it."""
        while (busy := self._pending.get(origin)) is not None:
            await busy.wait()
            answer = self._fresh(origin)
            if answer is not None:
                return answer
        done = self._pending[origin] = trio.Event()
        try:
            found = await fetcher.fetch(origin)
            answer = self._put(origin, found, self._ttl(found))
            self.counts["fetched"] += 1
        finally:
            del self._pending[origin]
            done.set()
        if found.shared and _SHAREABLE_ORIGIN.match(origin):
            await self._share(RobotsEntry(origin=origin, kind=found.kind, status=found.status,
                                          body=found.body, ttl_s=self._ttl(found)))
        return answer

    def _ttl(self, found: Found) -> int:
        return (self._s.unreachable_ttl_s if found.kind is RobotsKind.DISALLOW_ALL
                else self._s.ttl_s)

    def _put(self, origin: str, found: Found, ttl_s: float) -> Answer:
        answer = Answer(kind=found.kind, status=found.status, body=found.body,
                        failure=found.failure, expires_at=trio.current_time() + ttl_s)
        self._answers[origin] = answer
        self._answers.move_to_end(origin)
        while len(self._answers) > self._s.max_origins:
            self._answers.popitem(last=False)
        return answer

    async def _share(self, entry: RobotsEntry) -> None:
        """Queue ``entry``; share the queue once it is long or has waited long enough."""
        if not self._unshared:
            self._waiting_since = trio.current_time()
        self._unshared.append(entry)
        waited = trio.current_time() - self._waiting_since
        if len(self._unshared) >= SHARE_EVERY or waited >= SHARE_INTERVAL_S:
            await self.flush()

    async def flush(self) -> None:
        """Share the answers fetched here since the last time (one task at a time)."""
        if self._shared is None or self._sharing or not self._unshared:
            return
        entries, self._unshared = self._unshared, []
        self._sharing = True
        try:
            await self._shared.store(entries)
        finally:
            self._sharing = False

    def __len__(self) -> int:
        return len(self._answers)


@dataclass(frozen=True)
class RobotsGuard:
    """A ``RobotsCache`` with the fetcher of one stage: what ``Stage.one`` asks."""

    cache: RobotsCache
    fetcher: RobotsFetcher

    async def check(self, url: str) -> None:
        await self.cache.check(url, self.fetcher)
