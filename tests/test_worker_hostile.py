"""The hostile server mix: each misbehaviour ends in its named outcome within its deadline.

Runs on a ``MockClock``: the server's sleeps and drips and the worker's timeouts all
happen in virtual time, so a 60 s slow first byte costs no real second. The SSRF guard
stays on: fake public names resolve to public-looking addresses that the test dialer
carries onto loopback.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest
import trio
import trio.testing

from pairfarm.outcomes import Outcome
from tests import hostile_server as hs
from worker.batch import Network, Stage, open_stage
from worker.errors import FetchFailure
from worker.settings import FetchSettings, PipelineSettings

FETCH = FetchSettings(connect_timeout=5, read_timeout=10, deadline=20, max_retry_wait=30,
                      max_body_bytes=16 * 1024 * 1024, concurrency=64)
SETTINGS = PipelineSettings(fetch=FETCH, decode_threads=2)
JPEG = hs.jpeg_bytes(640, 480)


def _routes() -> dict[str, hs.Handler]:
    return {
        "/ok.jpg": hs.route_ok(JPEG),
        "/slow-first-byte.jpg": hs.route_slow_first_byte(60, JPEG),
        "/drip.jpg": hs.route_drip(JPEG, every=1.0),
        "/huge-declared.jpg": hs.route_stream(50 * 1024 * 1024, declare=True),
        "/huge-chunked.jpg": hs.route_stream(50 * 1024 * 1024, declare=False),
        "/gzip-bomb.jpg": hs.route_ok(GZIP_BOMB, headers={"Content-Encoding": "gzip"}),
        "/brotli-bomb.jpg": hs.route_ok(BROTLI_BOMB, headers={"Content-Encoding": "br"}),
        "/loop-a": hs.route_redirect("/loop-b"),
        "/loop-b": hs.route_redirect("/loop-a"),
        **{f"/chain-{i}": hs.route_redirect(f"/chain-{i + 1}") for i in range(10)},
        "/bomb.png": hs.route_ok(hs.png_bomb_header(30000, 30000), "image/png"),
        "/truncated.jpg": hs.route_ok(JPEG[: len(JPEG) * 2 // 3]),
        "/html.jpg": hs.route_ok(b"<html><body>" + b"<p>not an image</p>" * 600, "image/jpeg"),
        "/html-typed": hs.route_ok(b"<html>" + b"x" * 9000, "text/html"),
        "/tiny.jpg": hs.route_ok(hs.jpeg_bytes(16, 16, quality=50)),
        "/noai.jpg": hs.route_ok(JPEG, headers={"X-Robots-Tag": "noai"}),
        "/noimageindex.jpg": hs.route_ok(JPEG, headers={"X-Robots-Tag": "noarchive, noimageindex"}),
        "/noai-ours.jpg": hs.route_ok(JPEG, headers={"X-Robots-Tag": "pairfarm: noimageai"}),
        "/noai-other.jpg": hs.route_ok(JPEG, headers={"X-Robots-Tag": "otherbot: noai"}),
        "/reset.jpg": hs.route_reset(),
        "/missing.jpg": hs.route_status(404),
        "/broken.jpg": hs.route_status(500),
        "/always-429.jpg": hs.route_status(429, {"Retry-After": "5"}),
        "/429-for-an-hour.jpg": hs.route_status(429, {"Retry-After": "3600"}),
    }


GZIP_BOMB = hs.gzip_bomb(200 * 1024 * 1024)
BROTLI_BOMB = hs.brotli_bomb(200 * 1024 * 1024)

EXPECTED: dict[str, Outcome] = {
    "/ok.jpg": Outcome.OK,
    "/slow-first-byte.jpg": Outcome.TIMEOUT,
    "/drip.jpg": Outcome.TIMEOUT,
    "/huge-declared.jpg": Outcome.TOO_LARGE,
    "/huge-chunked.jpg": Outcome.TOO_LARGE,
    "/gzip-bomb.jpg": Outcome.TOO_LARGE,
    "/brotli-bomb.jpg": Outcome.TOO_LARGE,
    "/loop-a": Outcome.REDIRECT_LIMIT,
    "/chain-0": Outcome.REDIRECT_LIMIT,
    "/bomb.png": Outcome.BOMB,
    "/truncated.jpg": Outcome.DECODE_ERROR,
    "/html.jpg": Outcome.NOT_IMAGE,
    "/html-typed": Outcome.NOT_IMAGE,
    "/tiny.jpg": Outcome.TOO_SMALL,
    "/noai.jpg": Outcome.OPTED_OUT,
    "/noimageindex.jpg": Outcome.OPTED_OUT,
    "/noai-ours.jpg": Outcome.OPTED_OUT,
    "/noai-other.jpg": Outcome.OK,
    "/reset.jpg": Outcome.CONNECT,
    "/missing.jpg": Outcome.HTTP_4XX,
    "/broken.jpg": Outcome.HTTP_5XX,
    "/always-429.jpg": Outcome.HTTP_429,
    "/429-for-an-hour.jpg": Outcome.HTTP_429,
}


def _host_of(path: str) -> str:
    return path.strip("/").replace(".", "-") + ".example.test"


def run_virtual(fn: Callable[[], Awaitable[object]]) -> object:
    return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


async def _one(stage: Stage, url: str) -> tuple[Outcome, float]:
    """The outcome of ``url`` and the virtual seconds its fetch held a slot.

    Only the fetch is timed: while a decode thread runs, the mock clock jumps ahead to
    the next timer of the server, which is no time the fetch spent.
    """
    start = trio.current_time()
    try:
        fetched = await stage.fetch(url)
    except FetchFailure as exc:
        return exc.outcome, trio.current_time() - start
    elapsed = trio.current_time() - start
    try:
        await stage.decode(fetched)
    except FetchFailure as exc:
        return exc.outcome, elapsed
    return Outcome.OK, elapsed


def test_each_hostile_route_ends_in_its_outcome_within_the_deadline() -> None:
    results: dict[str, tuple[Outcome, float]] = {}

    async def main() -> None:
        # one host name per route: a host that answers 429 is backed off as a whole
        names = {_host_of(path): str(hs.PUBLIC_IP) for path in EXPECTED}
        dns, dialer = hs.fake_network(names)
        async with trio.open_nursery() as nursery:
            server = await hs.start_server(nursery, _routes())
            async with open_stage(SETTINGS, Network(resolver=dns, dialer=dialer)) as stage:
                async with trio.open_nursery() as fetches:
                    for path in EXPECTED:
                        url = server.url(path, _host_of(path))
                        fetches.start_soon(_record, stage, url, path)
                after = await _one(stage, server.url("/ok.jpg"))
                results["after the mix"] = after
            nursery.cancel_scope.cancel()

    async def _record(stage: Stage, url: str, path: str) -> None:
        results[path] = await _one(stage, url)

    run_virtual(main)
    outcomes = {path: outcome for path, (outcome, _) in results.items()}
    assert outcomes == {**EXPECTED, "after the mix": Outcome.OK}
    for path, (_, elapsed) in results.items():
        assert elapsed <= FETCH.deadline + 0.5, (path, elapsed)


def test_drip_is_cut_by_the_total_deadline_not_the_read_timeout() -> None:
    async def main() -> tuple[Outcome, float]:
        dns, dialer = hs.fake_network()
        async with trio.open_nursery() as nursery:
            server = await hs.start_server(nursery, {"/drip": hs.route_drip(JPEG, every=1.0)})
            settings = replace(SETTINGS, fetch=replace(FETCH, deadline=7, read_timeout=3))
            async with open_stage(settings, Network(resolver=dns, dialer=dialer)) as stage:
                result = await _one(stage, server.url("/drip"))
            nursery.cancel_scope.cancel()
        return result

    outcome, elapsed = run_virtual(main)  # type: ignore[misc]
    assert outcome is Outcome.TIMEOUT
    assert 7 <= elapsed < 7.5


def test_429_retry_after_is_honoured_then_the_image_arrives() -> None:
    limited = hs.Sequenced([hs.route_status(429, {"Retry-After": "12"}), hs.route_ok(JPEG)])

    async def main() -> tuple[Outcome, float]:
        dns, dialer = hs.fake_network()
        async with trio.open_nursery() as nursery:
            server = await hs.start_server(nursery, {"/limited.jpg": limited})
            async with open_stage(SETTINGS, Network(resolver=dns, dialer=dialer)) as stage:
                result = await _one(stage, server.url("/limited.jpg"))
            nursery.cancel_scope.cancel()
        return result

    outcome, elapsed = run_virtual(main)  # type: ignore[misc]
    assert outcome is Outcome.OK
    assert limited.calls == 2
    assert 12 <= elapsed < 13


def test_503_without_retry_after_backs_off_exponentially_then_gives_up() -> None:
    failing = hs.Sequenced([hs.route_status(503)])

    async def main() -> tuple[Outcome, float]:
        dns, dialer = hs.fake_network()
        async with trio.open_nursery() as nursery:
            server = await hs.start_server(nursery, {"/down.jpg": failing})
            fetch = replace(FETCH, deadline=100, max_retries=3)
            async with open_stage(replace(SETTINGS, fetch=fetch),
                                  Network(resolver=dns, dialer=dialer)) as stage:
                result = await _one(stage, server.url("/down.jpg"))
            nursery.cancel_scope.cancel()
        return result

    outcome, elapsed = run_virtual(main)  # type: ignore[misc]
    assert outcome is Outcome.HTTP_5XX
    assert failing.calls == 4
    # equal jitter: at least half of 1 + 2 + 4 seconds, at most all of it
    assert 3.5 <= elapsed <= 7.5


@pytest.mark.parametrize(("path", "cut_at"), [("/slow-first-byte.jpg", FETCH.read_timeout),
                                             ("/drip.jpg", FETCH.deadline)])
def test_a_slow_host_does_not_hold_up_other_hosts(path: str, cut_at: float) -> None:
    async def main() -> dict[str, tuple[Outcome, float]]:
        dns, dialer = hs.fake_network()
        done: dict[str, tuple[Outcome, float]] = {}

        async def timed(stage: Stage, name: str, url: str) -> None:
            done[name] = await _one(stage, url)

        async with trio.open_nursery() as nursery:
            server = await hs.start_server(nursery, _routes())
            async with (open_stage(SETTINGS, Network(resolver=dns, dialer=dialer)) as stage,
                        trio.open_nursery() as fetches):
                fetches.start_soon(timed, stage, "slow", server.url(path))
                fetches.start_soon(timed, stage, "fast", server.url("/ok.jpg", "cdn.example.test"))
            nursery.cancel_scope.cancel()
        return done

    done = run_virtual(main)
    assert done == {"slow": (Outcome.TIMEOUT, cut_at), "fast": (Outcome.OK, 0.0)}
