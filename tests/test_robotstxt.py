"""robots.txt (RFC 9309): answers by status, the user-agent token, the farm's shared cache.

A small HTTP server on several loopback addresses (each a host of its own) serves each
host's robots.txt and images; it logs every request, so the tests count robots.txt
fetches. The worker side runs the real client (SSRF guard with private targets allowed,
the configured User-Agent); the shared cache goes through a real coordinator on a real
PostgreSQL. Timeouts run on Trio's ``MockClock``.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import trio
import trio.testing
from PIL import Image
from protego import Protego

from pairfarm.client import AsyncCoordinatorClient, Unauthorized
from pairfarm.outcomes import Outcome
from pairfarm.protocol import API_PREFIX, ROBOTS_MAX_BYTES, RobotsEntry, RobotsKind
from tests import hostile_server as hs
from tests.conftest import RunningCoordinator
from worker.addresses import AddressPolicy
from worker.errors import FetchFailure, SettingsError
from worker.network import GuardedBackend, TrioDialer
from worker.resolver import CachingResolver, SystemResolver
from worker.robotstxt import (
    CoordinatorRobots,
    RobotsCache,
    RobotsFetcher,
    SharedRobots,
    origin_of,
    rule_lines,
)
from worker.settings import FetchSettings, RobotsSettings, user_agent_for
from worker.transport import build_client

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")

# -- a loopback web: one server, several hosts -----------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


HANG = Reply(status=0)  # never answers
NOT_FOUND = Reply(404, b"not found")


@dataclass(frozen=True)
class Hit:
    host: str
    path: str
    user_agent: str


class LoopbackWeb:
    """``sites[host][path]`` answers; every request logged in ``hits``."""

    def __init__(self) -> None:
        self.sites: dict[str, dict[str, Reply]] = {host: {} for host in HOSTS}
        self.hits: list[Hit] = []
        self.port = 0

    def url(self, host: str, path: str) -> str:
        return f"http://{host}:{self.port}{path}"

    def robots_fetches(self) -> Counter[str]:
        return Counter(h.host for h in self.hits if h.path == "/robots.txt")

    async def serve(self, nursery: trio.Nursery) -> None:
        for host in HOSTS:
            listeners = await trio.open_tcp_listeners(self.port, host=host)
            self.port = listeners[0].socket.getsockname()[1]
            nursery.start_soon(trio.serve_listeners, self._handler(host), listeners)

    def _handler(self, host: str) -> Callable[[trio.SocketStream], Awaitable[None]]:
        async def handle(stream: trio.SocketStream) -> None:
            async with stream:
                # the client may stop reading (a capped body)
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._answer(host, stream)
        return handle

    async def _answer(self, host: str, stream: trio.SocketStream) -> None:
        data = await hs.read_head(stream)
        if data is None:
            return
        lines = data.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
        path = lines[0].split(" ")[1]
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(":") for line in lines[1:])}
        self.hits.append(Hit(host, path, headers.get("user-agent", "")))
        reply = self.sites[host].get(path, NOT_FOUND)
        if reply is HANG:
            await trio.sleep_forever()
        head = [f"HTTP/1.1 {reply.status} X", f"Content-Length: {len(reply.body)}",
                "Connection: close", *(f"{k}: {v}" for k, v in reply.headers.items())]
        await stream.send_all(("\r\n".join(head) + "\r\n\r\n").encode() + reply.body)


def robots(text: str) -> Reply:
    return Reply(200, text.encode(), {"Content-Type": "text/plain"})


def redirect(to: str, status: int = 301) -> Reply:
    return Reply(status, b"", {"Location": to})


def jpeg_bytes(seed: int = 0) -> bytes:
    import random

    rng = random.Random(seed)
    image = Image.new("RGB", (64, 64))
    image.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256))
                   for _ in range(64 * 64)])
    out = io.BytesIO()
    image.save(out, "JPEG", quality=95)
    return out.getvalue()


# -- the worker side -------------------------------------------------------------------


def fetch_settings(token: str = "pairfarm", *, allow_private: bool = True) -> FetchSettings:
    return FetchSettings(policy=AddressPolicy(allow_private=allow_private),
                         agent_token=token, user_agent=user_agent_for(token))


@asynccontextmanager
async def robots_fetcher(fetch: FetchSettings,
                         settings: RobotsSettings | None = None) -> AsyncIterator[RobotsFetcher]:
    backend = GuardedBackend(CachingResolver(SystemResolver()), fetch.policy, TrioDialer())
    async with build_client(fetch, backend) as client:
        yield RobotsFetcher(settings or RobotsSettings(), fetch, client)


async def verdict(cache: RobotsCache, fetcher: RobotsFetcher, url: str) -> Outcome | None:
    """None when ``url`` may be fetched, else the outcome it ends in."""
    try:
        await cache.check(url, fetcher)
    except FetchFailure as exc:
        return exc.outcome
    return None


Scenario = Callable[[LoopbackWeb, RobotsCache, RobotsFetcher], Awaitable[None]]


def run_web(scenario: Scenario, *, token: str = "pairfarm", clock: Any = None,
            settings: RobotsSettings | None = None, allow_private: bool = True,
            sites: dict[str, dict[str, Reply]] | None = None) -> LoopbackWeb:
    """Run ``scenario`` against a fresh loopback web and a fresh cache; the web returned
    holds the requests it saw."""
    web = LoopbackWeb()
    for host, routes in (sites or {}).items():
        web.sites[host].update(routes)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await web.serve(nursery)
            fetch = fetch_settings(token, allow_private=allow_private)
            async with robots_fetcher(fetch, settings) as fetcher:
                cache = RobotsCache(settings or RobotsSettings(), token)
                await scenario(web, cache, fetcher)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=clock)
    return web


# -- answers by status -------------------------------------------------------------------

RULES = "User-agent: *\nDisallow: /private/\nAllow: /private/ok.jpg\n"


def test_rules_allow_and_disallow_and_one_fetch_per_origin() -> None:
    seen: dict[str, Outcome | None] = {}

    async def scenario(web: LoopbackWeb, cache: RobotsCache, fetcher: RobotsFetcher) -> None:
        paths = ["/a.jpg", "/private/x.jpg", "/private/ok.jpg", "/b/c.jpg"] * 10

        async def one(path: str) -> None:
            seen[path] = await verdict(cache, fetcher, web.url(HOSTS[0], path))

        async with trio.open_nursery() as nursery:
            for path in paths:  # 40 URLs of one origin at once: one robots.txt fetch
                nursery.start_soon(one, path)

    web = run_web(scenario, sites={HOSTS[0]: {"/robots.txt": robots(RULES)}})
    assert seen == {"/a.jpg": None, "/private/x.jpg": Outcome.ROBOTS_DISALLOWED,
                    "/private/ok.jpg": None, "/b/c.jpg": None}
    assert web.robots_fetches() == {HOSTS[0]: 1}
    assert [h.path for h in web.hits] == ["/robots.txt"], "only robots.txt was requested"


@pytest.mark.parametrize("status", [401, 403, 404, 410])
def test_4xx_means_everything_is_allowed(status: int) -> None:
    seen: list[Outcome | None] = []

    async def scenario(web: LoopbackWeb, cache: RobotsCache, fetcher: RobotsFetcher) -> None:
        for path in ("/a.jpg", "/private/x.jpg"):
            seen.append(await verdict(cache, fetcher, web.url(HOSTS[0], path)))

    web = run_web(scenario, sites={HOSTS[0]: {
        "/robots.txt": Reply(status, b"User-agent: *\nDisallow: /\n")}})
    assert seen == [None, None]
    assert web.robots_fetches() == {HOSTS[0]: 1}


@pytest.mark.parametrize(("status", "outcome"), [
    (500, Outcome.HTTP_5XX), (503, Outcome.HTTP_5XX), (429, Outcome.HTTP_429)])
def test_5xx_and_429_disallow_everything_for_a_while(status: int, outcome: Outcome) -> None:
    """Disallowed (nothing but robots.txt requested) with the status's own outcome, for
    the unreachable TTL; then robots.txt is fetched again and its rules apply."""
    clock = trio.testing.MockClock()  # moves only when the test jumps it
    seen: list[Outcome | None] = []
    details: list[str] = []
    settings = RobotsSettings(unreachable_ttl_s=600)

    async def scenario(web: LoopbackWeb, cache: RobotsCache, fetcher: RobotsFetcher) -> None:
        url = web.url(HOSTS[0], "/a.jpg")
        try:
            await cache.check(url, fetcher)
        except FetchFailure as exc:
            seen.append(exc.outcome)
            details.append(exc.detail)
        clock.jump(599)
        seen.append(await verdict(cache, fetcher, url))
        assert web.robots_fetches() == {HOSTS[0]: 1}, "still disallowed, not fetched again"
        web.sites[HOSTS[0]]["/robots.txt"] = robots("User-agent: *\nDisallow: /b/\n")
        clock.jump(2)
        seen.append(await verdict(cache, fetcher, url))
        seen.append(await verdict(cache, fetcher, web.url(HOSTS[0], "/b/x.jpg")))

    web = run_web(scenario, clock=clock, settings=settings,
                  sites={HOSTS[0]: {"/robots.txt": Reply(status, b"busy")}})
    assert seen == [outcome, outcome, None, Outcome.ROBOTS_DISALLOWED]
    assert "robots.txt" in details[0] and f"HTTP {status}" in details[0]
    assert web.robots_fetches() == {HOSTS[0]: 2}
    assert [h.path for h in web.hits] == ["/robots.txt", "/robots.txt"]


def test_no_answer_disallows_with_timeout() -> None:
    """A robots.txt that never answers: the URL ends ``timeout`` (after the robots.txt
    timeout of virtual time), is never requested, and the answer is kept."""
    seen: list[Outcome | None] = []
    took: list[float] = []

    async def scenario(web: LoopbackWeb, cache: RobotsCache, fetcher: RobotsFetcher) -> None:
        start = trio.current_time()
        seen.append(await verdict(cache, fetcher, web.url(HOSTS[0], "/a.jpg")))
        took.append(trio.current_time() - start)
        seen.append(await verdict(cache, fetcher, web.url(HOSTS[0], "/b.jpg")))

    settings = RobotsSettings(timeout_s=30.0)
    web = run_web(scenario, clock=trio.testing.MockClock(autojump_threshold=0),
                  settings=settings, sites={HOSTS[0]: {"/robots.txt": HANG}})
    assert seen == [Outcome.TIMEOUT, Outcome.TIMEOUT]
    assert 10.0 <= took[0] <= 30.0  # the read timeout (10 s) or the robots.txt bound
    assert [h.path for h in web.hits] == ["/robots.txt"]


def test_unreachable_host_ends_in_the_network_outcome() -> None:
    """Nobody listens on the port: ``connect``, robots.txt named in the detail."""
    failures: list[FetchFailure] = []

    async def scenario(web: LoopbackWeb, cache: RobotsCache, fetcher: RobotsFetcher) -> None:
        try:
            await cache.check(f"http://{HOSTS[0]}:1/a.jpg", fetcher)
        except FetchFailure as exc:
            failures.append(exc)

    run_web(scenario)
    assert [f.outcome for f in failures] == [Outcome.CONNECT]
    assert "robots.txt" in failures[0].detail


def test_ssrf_guard_applies_to_robots_txt() -> None:
    seen: list[Outcome | None] = []

    async def scenario(web: LoopbackWeb, cache: RobotsCache, fetcher: RobotsFetcher) -> None:
        seen.append(await verdict(cache, fetcher, web.url(HOSTS[0], "/a.jpg")))

    web = run_web(scenario, allow_private=False,
                  sites={HOSTS[0]: {"/robots.txt": robots("User-agent: *\nAllow: /\n")}})
    assert seen == [Outcome.SSRF_BLOCKED]
    assert web.hits == []


def test_redirects_are_followed_up_to_five() -> None:
    seen: list[Outcome | None] = []
    chain = {"/robots.txt": redirect("/r1")}
    chain |= {f"/r{i}": redirect(f"/r{i + 1}", 302) for i in range(1, 5)}
    chain |= {"/r5": robots("User-agent: *\nDisallow: /\n")}  # 5 redirects: followed
    too_far = {"/robots.txt": redirect("/s1")}
    too_far |= {f"/s{i}": redirect(f"/s{i + 1}", 307) for i in range(1, 6)}
    too_far |= {"/s6": robots("User-agent: *\nDisallow: /\n")}  # 6: "unavailable"

    async def scenario(web: LoopbackWeb, cache: RobotsCache, fetcher: RobotsFetcher) -> None:
        web.sites[HOSTS[2]]["/robots.txt"] = redirect(
            f"http://{HOSTS[3]}:{web.port}/robots.txt")
        for host in HOSTS[:3]:
            seen.append(await verdict(cache, fetcher, web.url(host, "/a.jpg")))

    web = run_web(scenario, sites={HOSTS[0]: chain, HOSTS[1]: too_far, HOSTS[2]: {},
                                   HOSTS[3]: {"/robots.txt": robots(RULES + "Disallow: /a")}})
    assert seen == [Outcome.ROBOTS_DISALLOWED, None, Outcome.ROBOTS_DISALLOWED]
    assert sum(1 for h in web.hits if h.host == HOSTS[1]) == 6


def test_only_the_first_500_kib_are_read() -> None:
    seen: list[Outcome | None] = []
    padding = "# " + "x" * 1000 + "\n"
    head = "User-agent: *\nDisallow: /early/\n"
    text = head + padding * (ROBOTS_MAX_BYTES // len(padding) + 10) + "Disallow: /late/\n"

    async def scenario(web: LoopbackWeb, cache: RobotsCache, fetcher: RobotsFetcher) -> None:
        for path in ("/early/a.jpg", "/late/a.jpg"):
            seen.append(await verdict(cache, fetcher, web.url(HOSTS[0], path)))

    run_web(scenario, sites={HOSTS[0]: {"/robots.txt": robots(text)}})
    assert len(text) > ROBOTS_MAX_BYTES + 9_000
    assert seen == [Outcome.ROBOTS_DISALLOWED, None]


# -- the user-agent token ------------------------------------------------------------------

TOKEN_RULES = ("User-agent: mybot\nDisallow: /mine/\n\n"
               "User-agent: *\nDisallow: /\n")


@pytest.mark.parametrize(("token", "expected"), [
    ("mybot", [None, Outcome.ROBOTS_DISALLOWED]),  # its own group, not *'s
    ("MyBot", [None, Outcome.ROBOTS_DISALLOWED]),  # matched case-insensitively
    ("pairfarm", [Outcome.ROBOTS_DISALLOWED, Outcome.ROBOTS_DISALLOWED]),  # * applies
    ("mybo", [Outcome.ROBOTS_DISALLOWED, Outcome.ROBOTS_DISALLOWED]),  # not a prefix match
])
def test_the_group_of_our_token_wins_over_star(token: str,
                                               expected: list[Outcome | None]) -> None:
    seen: list[Outcome | None] = []

    async def scenario(web: LoopbackWeb, cache: RobotsCache, fetcher: RobotsFetcher) -> None:
        for path in ("/a.jpg", "/mine/a.jpg"):
            seen.append(await verdict(cache, fetcher, web.url(HOSTS[0], path)))

    web = run_web(scenario, token=token, sites={HOSTS[0]: {"/robots.txt": robots(TOKEN_RULES)}})
    assert seen == expected
    agent = web.hits[0].user_agent
    assert agent.startswith(token) and "pairfarm/" in agent, agent


def test_the_token_must_be_a_product_token() -> None:
    for bad in ("my bot", "bot/1.0", "", "bot;x"):
        with pytest.raises(SettingsError, match="user-agent token"):
            fetch_settings(bad)
    assert user_agent_for("pairfarm").startswith("pairfarm/")
    assert user_agent_for("mybot").startswith("mybot (compatible; pairfarm/")


def test_rule_lines_mean_what_the_whole_file_means() -> None:
    """What is kept and shared (no comments, blanks, sitemaps) parses to the same rules,
    crawl-delay lines (which end a group) included."""
    text = ("# hello\nSitemap: https://x/sitemap.xml\n\nUser-agent: a\nCrawl-delay: 5\n"
            "User-agent: b   # the b bot\nDisallow: /b/\n\n\nUser-agent: *\n"
            "Disallow: /private # no\nAllow: /private/ok\nsitemap: /s2.xml\n")
    kept = rule_lines(text)
    assert "Sitemap" not in kept and "sitemap" not in kept and "#" not in kept
    whole, part = Protego.parse(text), Protego.parse(kept)
    for agent in ("a", "b", "c"):
        for path in ("/b/1", "/private/1", "/private/ok", "/x"):
            url = f"http://h{path}"
            assert whole.can_fetch(url, agent) == part.can_fetch(url, agent), (agent, path)
    assert part.can_fetch("http://h/b/1", "a") and not part.can_fetch("http://h/b/1", "b")


def test_origin_of() -> None:
    assert origin_of("http://Example.COM:80/a b?q") == "http://example.com"
    assert origin_of("https://example.com:8443/x") == "https://example.com:8443"
    assert origin_of("http://bücher.de/x") == "http://xn--bcher-kva.de"
    assert origin_of("http://[::1]:81/") == "http://[::1]:81"
    assert origin_of("ftp://x/y") is None
    assert origin_of("not a url") is None


# -- the farm's shared cache ---------------------------------------------------------------


def _entry(origin: str, body: str = "User-agent: *\nDisallow: /x\n", ttl: int = 600,
           kind: RobotsKind = RobotsKind.RULES, status: int = 200) -> RobotsEntry:
    return RobotsEntry(origin=origin, kind=kind, status=status, body=body, ttl_s=ttl)


def test_coordinator_stores_and_answers(coordinator: RunningCoordinator) -> None:
    worker, gpu = coordinator.token("worker"), coordinator.token("gpu")

    async def main() -> None:
        async with AsyncCoordinatorClient(coordinator.url, worker) as client, \
                AsyncCoordinatorClient(coordinator.url, gpu) as other:
            assert await client.robots_lookup(["http://a.test"]) == []
            assert await client.robots_store([
                _entry("http://a.test"), _entry("http://b.test:81", "", 60,
                                                RobotsKind.DISALLOW_ALL, 503),
                _entry("http://a.test", "User-agent: *\nDisallow: /y\n")]) == 2
            found = {c.origin: c for c in await client.robots_lookup(
                ["http://a.test", "http://b.test:81", "http://c.test"])}
            assert set(found) == {"http://a.test", "http://b.test:81"}
            assert found["http://a.test"].body == "User-agent: *\nDisallow: /y\n"
            assert (found["http://b.test:81"].kind, found["http://b.test:81"].status) == (
                RobotsKind.DISALLOW_ALL, 503)
            assert 590 < found["http://a.test"].expires_in_s <= 600
            assert 50 < found["http://b.test:81"].expires_in_s <= 60
            with pytest.raises(Unauthorized):
                await other.robots_lookup(["http://a.test"])
            with pytest.raises(Unauthorized):
                await other.robots_store([_entry("http://a.test")])

    trio.run(main)


@pytest.mark.parametrize("body", [
    {"origins": ["http://a.test/path"]},
    {"origins": ["file:///etc"]},
    {"origins": []},
    {"origins": ["http://a.test"] * 1001},
    {"origins": ["http://a.test"], "extra": 1},
])
def test_lookup_input_is_strict(coordinator: RunningCoordinator, body: object) -> None:
    answer = httpx.post(f"{coordinator.url}{API_PREFIX}/robots/lookup", json=body,
                        headers={"Authorization": f"Bearer {coordinator.token('worker')}"})
    assert answer.status_code == 422, answer.text


def test_store_input_is_strict(coordinator: RunningCoordinator) -> None:
    token = coordinator.token("worker")
    good = {"origin": "http://a.test", "kind": "rules", "status": 200, "body": "", "ttl_s": 60}
    for bad in ({"ttl_s": 86_401}, {"ttl_s": 0}, {"ttl_s": 1.5}, {"kind": "maybe"},
                {"status": "200"}, {"body": "a\x00b"}, {"body": "x" * (ROBOTS_MAX_BYTES + 1)},
                {"origin": "http://A.test"}):
        answer = httpx.post(f"{coordinator.url}{API_PREFIX}/robots",
                            json={"entries": [good | bad]},
                            headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert answer.status_code in (413, 422), (bad, answer.text)
    for body in ({"entries": []}, {"entries": [good] * 201}):
        answer = httpx.post(f"{coordinator.url}{API_PREFIX}/robots", json=body,
                            headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert answer.status_code == 422, answer.text


def test_large_answers_come_in_several_responses_and_expire(
        coordinator: RunningCoordinator) -> None:
    """10 bodies of 450 KB (4.4 MB) exceed one store request (1 MiB) and one lookup
    response (4 MiB): the client splits the store and asks again for the rest. An
    expired answer is not served and is purged by a later store."""
    token = coordinator.token("worker")
    origins = [f"http://big{i}.test" for i in range(10)]
    body = "User-agent: *\n" + "Disallow: /p\n" * (450_000 // 12)

    async def main() -> list[str]:
        async with AsyncCoordinatorClient(coordinator.url, token) as client:
            # 4.4 MB in one call: the client sends requests under the 1 MiB cap
            assert await client.robots_store([_entry(o, body) for o in origins]) == 10
            raw = await client._http.post(f"{API_PREFIX}/robots/lookup",
                                          json={"origins": origins})
            assert len(raw.json()["entries"]) < 10 and raw.json()["more"]
            return [c.origin for c in await client.robots_lookup(origins)]

    assert sorted(trio.run(main)) == origins
    engine = sa.create_engine(coordinator.database_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE robots_txt SET expires_at = now() - interval '1 s' "
                                 "WHERE origin = 'http://big0.test'"))

        async def after() -> list[str]:
            async with AsyncCoordinatorClient(coordinator.url, token) as client:
                found = [c.origin for c in await client.robots_lookup(origins)]
                await client.robots_store([_entry("http://other.test")])
                return found

        assert sorted(trio.run(after)) == origins[1:]
        with engine.connect() as conn:
            left = conn.execute(sa.text("SELECT origin FROM robots_txt WHERE origin = "
                                        "'http://big0.test'")).all()
        assert left == []
    finally:
        engine.dispose()


@dataclass
class CountingShared:
    """A ``SharedRobots`` that counts the calls it passes on."""

    inner: SharedRobots
    calls: Counter[str] = field(default_factory=Counter)

    async def lookup(self, origins: list[str]) -> Any:
        self.calls["lookup"] += 1
        return await self.inner.lookup(origins)

    async def store(self, entries: list[RobotsEntry]) -> None:
        self.calls["store"] += 1
        self.calls["stored"] += len(entries)
        await self.inner.store(entries)


def test_two_workers_share_each_origins_robots_txt(coordinator: RunningCoordinator) -> None:
    """Worker A checks URLs of 4 hosts (rules, 404, 503, rules): 4 robots.txt fetches,
    shared through the real coordinator; worker B (its own token, process cache and
    client) prepares its batch with one lookup and fetches none, with the same verdicts.
    A host that did not answer (``connect``) is this worker's view: not shared."""
    tokens = [coordinator.token("worker", "vm-a"), coordinator.token("worker", "vm-b")]
    sites = {HOSTS[0]: {"/robots.txt": robots(RULES)},
             HOSTS[1]: {"/robots.txt": NOT_FOUND},
             HOSTS[2]: {"/robots.txt": Reply(503, b"")},
             HOSTS[3]: {"/robots.txt": robots("User-agent: pairfarm\nDisallow: /\n")}}
    web = LoopbackWeb()
    for host, routes in sites.items():
        web.sites[host].update(routes)
    verdicts: list[list[Outcome | None]] = []
    shared: list[CountingShared] = []

    async def worker(token: str, urls: list[str]) -> None:
        async with AsyncCoordinatorClient(coordinator.url, token) as client, \
                robots_fetcher(fetch_settings()) as fetcher:
            counting = CountingShared(CoordinatorRobots(client))
            cache = RobotsCache(RobotsSettings(), "pairfarm", counting)
            await cache.prepare(urls)
            verdicts.append([await verdict(cache, fetcher, url) for url in urls])
            await cache.flush()
            shared.append(counting)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await web.serve(nursery)
            urls = [web.url(host, path) for host in HOSTS for path in ("/a.jpg", "/private/b")]
            urls.append(f"http://127.0.0.6:{web.port}/nobody.jpg")
            await worker(tokens[0], urls)
            await worker(tokens[1], urls[::-1])
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert web.robots_fetches() == {host: 1 for host in HOSTS}
    assert verdicts[0] == [None, Outcome.ROBOTS_DISALLOWED, None, None,
                           Outcome.HTTP_5XX, Outcome.HTTP_5XX,
                           Outcome.ROBOTS_DISALLOWED, Outcome.ROBOTS_DISALLOWED,
                           Outcome.CONNECT]
    assert verdicts[1] == verdicts[0][::-1]
    assert (shared[0].calls["lookup"], shared[0].calls["stored"]) == (1, 4)
    assert shared[1].calls == {"lookup": 1}, "B fetched only the unreachable host's"


def test_settings_bounds() -> None:
    for bad in ({"ttl_s": 0}, {"ttl_s": 86_401}, {"unreachable_ttl_s": 0},
                {"max_bytes": ROBOTS_MAX_BYTES + 1}, {"max_redirects": -1},
                {"timeout_s": 0}):
        with pytest.raises(SettingsError):
            RobotsSettings(**bad)  # type: ignore[arg-type]


# -- in the download pipeline ----------------------------------------------------------------


def test_two_worker_pipelines_share_robots_txt_and_skip_disallowed(
        coordinator: RunningCoordinator, tmp_path: Path) -> None:
    """Two workers' pipelines (``SharedPipeline``, each with its own coordinator client,
    token and robots cache) download a batch each over the same 3 hosts: each host's
    robots.txt is fetched once in all; disallowed URLs end ``robots_disallowed`` and are
    never requested, the others are downloaded; a 503 robots.txt leaves its host's URLs
    unrequested (``http_5xx``)."""
    import fsspec

    from pairfarm.protocol import Candidate
    from worker.batch import Network
    from worker.metrics import build_metrics
    from worker.pipeline import BatchRun, SharedPipeline
    from worker.settings import PipelineSettings

    tokens = [coordinator.token("worker", "vm-a"), coordinator.token("worker", "vm-b")]
    image = jpeg_bytes()
    web = LoopbackWeb()
    for host in HOSTS[:3]:
        web.sites[host].update({f"/{d}/{n}.jpg": Reply(200, image, {"Content-Type": "image/jpeg"})
                                for d in ("pub", "private") for n in range(6)})
    web.sites[HOSTS[0]]["/robots.txt"] = robots("User-agent: *\nDisallow: /private/\n")
    web.sites[HOSTS[1]]["/robots.txt"] = robots("User-agent: pairfarm\nDisallow: /pub/\n"
                                                "User-agent: *\nDisallow: /\n")
    web.sites[HOSTS[2]]["/robots.txt"] = Reply(503, b"")
    outcomes: list[Counter[str]] = []
    settings = PipelineSettings(fetch=fetch_settings(), decode_threads=2)

    async def worker(number: int, token: str) -> None:
        candidates = [Candidate(id=i, url=web.url(host, f"/{d}/{n}.jpg"), caption="")
                      for i, (host, d, n) in enumerate(
                          (h, d, n + 3 * number) for h in HOSTS[:3]
                          for d in ("pub", "private") for n in range(3))]
        async with AsyncCoordinatorClient(coordinator.url, token) as client:
            network = Network(robots=RobotsCache(RobotsSettings(), "pairfarm",
                                                 CoordinatorRobots(client)))
            async with SharedPipeline.open(settings, network, build_metrics()) as pipeline:
                prepared = await pipeline.download(
                    number + 1, candidates, BatchRun(size=len(candidates)),
                    fs=fsspec.filesystem("file"), directory=str(tmp_path / f"w{number}"))
                await prepared.commit()
                outcomes.append(prepared.outcomes)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await web.serve(nursery)
            for number, token in enumerate(tokens):
                await worker(number, token)
            nursery.cancel_scope.cancel()

    trio.run(main)
    expected = {"ok": 3 + 3, "robots_disallowed": 3 + 3, "http_5xx": 6}
    assert outcomes == [Counter(expected), Counter(expected)]
    assert web.robots_fetches() == {host: 1 for host in HOSTS[:3]}
    by_host = Counter(h.host for h in web.hits if h.path != "/robots.txt")
    assert by_host == {HOSTS[0]: 6, HOSTS[1]: 6}, "host 2: nothing but robots.txt"
    assert {h.path.split("/")[1] for h in web.hits
            if h.host == HOSTS[0] and h.path != "/robots.txt"} == {"pub"}
    assert {h.path.split("/")[1] for h in web.hits
            if h.host == HOSTS[1] and h.path != "/robots.txt"} == {"private"}
