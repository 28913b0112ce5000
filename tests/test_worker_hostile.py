"""The hostile server mix: each misbehaviour ends in its named outcome within its deadline.

Runs on a ``MockClock``: the server's sleeps and drips and the worker's timeouts all
happen in virtual time, so a 60 s slow first byte costs no real second. The SSRF guard
stays on: fake public names resolve to public-looking addresses that the test dialer
carries onto loopback.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import trio
import trio.testing

from pairfarm.outcomes import Outcome
from tests import hostile_server as hs
from tests.conftest import run_cli
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
        # the bytes decide, not the Content-Type (worker.sniff)
        "/jpeg-as-html": hs.route_ok(JPEG, "text/html; charset=utf-8"),
        "/jpeg-as-octets": hs.route_ok(JPEG, "application/octet-stream"),
        "/text.jpg": hs.route_ok(b"Not Found. " * 900, "image/jpeg"),
        "/tiny.jpg": hs.route_ok(hs.jpeg_bytes(16, 16, quality=50)),
        "/noai.jpg": hs.route_ok(JPEG, headers={"X-Robots-Tag": "noai"}),
        "/noimageindex.jpg": hs.route_ok(JPEG, headers={"X-Robots-Tag": "noarchive, noimageindex"}),
        "/noai-ours.jpg": hs.route_ok(JPEG, headers={"X-Robots-Tag": "pairfarm: noimageai"}),
        "/noai-other.jpg": hs.route_ok(JPEG, headers={"X-Robots-Tag": "otherbot: noai"}),
        "/noml.jpg": hs.route_ok(JPEG, headers={"X-Robots-Tag": "noml"}),
        "/tdm-reserved.jpg": hs.route_ok(JPEG, headers={"tdm-reservation": "1"}),
        "/tdm-not-reserved.jpg": hs.route_ok(JPEG, headers={"tdm-reservation": "0"}),
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
    "/jpeg-as-html": Outcome.OK,
    "/jpeg-as-octets": Outcome.OK,
    "/text.jpg": Outcome.NOT_IMAGE,
    "/tiny.jpg": Outcome.TOO_SMALL,
    "/noai.jpg": Outcome.OPTED_OUT,
    "/noimageindex.jpg": Outcome.OPTED_OUT,
    "/noai-ours.jpg": Outcome.OPTED_OUT,
    "/noai-other.jpg": Outcome.OK,
    "/noml.jpg": Outcome.OPTED_OUT,
    "/tdm-reserved.jpg": Outcome.OPTED_OUT,
    "/tdm-not-reserved.jpg": Outcome.OK,
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


# -- queueing for a host: its own bound, never the URL's deadline ----------------------------


async def _queued_behind(settings: PipelineSettings, first: hs.Handler, count: int,
                         gap: float, each: float = 0.0
                         ) -> tuple[dict[str, tuple[Outcome, float]], list[str]]:
    """``/first`` of one host alone, then ``count`` URLs of that host ``gap`` s later,
    each answered after ``each`` seconds.

    Returns each URL's outcome and seconds, and the paths the server was asked for.
    """
    done: dict[str, tuple[Outcome, float]] = {}

    async def timed(stage: Stage, path: str, url: str) -> None:
        done[path] = await _one(stage, url)

    dns, dialer = hs.fake_network()
    queued = hs.route_slow_first_byte(each, JPEG)
    routes = {"/first": first, **{f"/q{i}": queued for i in range(count)}}
    async with trio.open_nursery() as nursery:
        server = await hs.start_server(nursery, routes)
        async with (open_stage(settings, Network(resolver=dns, dialer=dialer)) as stage,
                    trio.open_nursery() as fetches):
            fetches.start_soon(timed, stage, "/first", server.url("/first"))
            await trio.sleep(gap)
            for i in range(count):
                fetches.start_soon(timed, stage, f"/q{i}", server.url(f"/q{i}"))
        nursery.cancel_scope.cancel()
    return done, [request.path for request in server.requests]


def _per_host_1(**fetch: float) -> PipelineSettings:
    return replace(SETTINGS, fetch=replace(FETCH, per_host=1, **fetch))  # type: ignore[arg-type]


def test_urls_queued_behind_a_slow_url_of_their_host_are_not_timed_out() -> None:
    """The drip holds the host's only slot for the whole 20 s deadline; the 30 URLs
    behind it (1 s each) wait far longer than their own deadline, and each is fetched."""
    drip = hs.route_drip(JPEG, every=1.0)
    done, asked = run_virtual(  # type: ignore[misc]
        lambda: _queued_behind(_per_host_1(), drip, 30, 0.1, each=1.0))
    assert done["/first"] == (Outcome.TIMEOUT, FETCH.deadline)
    queued = {path: outcome for path, (outcome, _) in done.items() if path != "/first"}
    assert queued == {f"/q{i}": Outcome.OK for i in range(30)}
    assert sorted(asked) == sorted(done)


def test_urls_that_never_get_a_slot_end_host_busy_and_are_never_requested() -> None:
    drip = hs.route_drip(JPEG, every=1.0)
    settings = _per_host_1(host_queue_timeout=5)
    done, asked = run_virtual(lambda: _queued_behind(settings, drip, 10, 0.1))  # type: ignore[misc]
    assert done["/first"][0] is Outcome.TIMEOUT
    assert {path: outcome for path, (outcome, _) in done.items() if path != "/first"} == {
        f"/q{i}": Outcome.HOST_BUSY for i in range(10)}
    assert asked == ["/first"]
    assert all(4.9 <= seconds <= 5.1 for path, (_, seconds) in done.items() if path != "/first")


# -- one Retry-After does not fail the host's queue ------------------------------------------


def _a_year_ahead() -> str:
    return format_datetime(datetime.now(UTC) + timedelta(days=365), usegmt=True)


@pytest.mark.parametrize("cap", [45.0, 60.0])
def test_a_year_long_retry_after_is_capped_and_charged_to_its_own_url_only(cap: float) -> None:
    """A 503 with ``Retry-After`` a year ahead closes the host for ``max_retry_after``;
    the 12 URLs of that host that had sent nothing yet wait, then are fetched."""
    first = hs.route_status(503, {"Retry-After": _a_year_ahead()})
    settings = replace(SETTINGS, fetch=replace(FETCH, max_retry_after=cap))
    done, asked = run_virtual(lambda: _queued_behind(settings, first, 12, 1.0))  # type: ignore[misc]
    assert done["/first"][0] is Outcome.HTTP_5XX  # its own answer
    for i in range(12):
        outcome, seconds = done[f"/q{i}"]
        assert outcome is Outcome.OK
        assert cap - 1.0 <= seconds <= cap - 1.0 + 0.5  # the window opens `cap` s after /first
    assert sorted(asked) == sorted(done)


def test_a_host_closed_past_the_queue_bound_gives_host_busy_not_its_status() -> None:
    first = hs.route_status(503, {"Retry-After": _a_year_ahead()})
    settings = replace(SETTINGS, fetch=replace(FETCH, max_retry_after=600, host_queue_timeout=120))
    done, asked = run_virtual(lambda: _queued_behind(settings, first, 12, 1.0))  # type: ignore[misc]
    assert done["/first"][0] is Outcome.HTTP_5XX
    assert {done[f"/q{i}"][0] for i in range(12)} == {Outcome.HOST_BUSY}
    assert asked == ["/first"]


def test_a_retry_that_gets_no_slot_in_time_keeps_its_own_answer() -> None:
    """Its own 429 asked for 10 s; the queue bound (5 s) ends first: http_429, not host_busy."""
    limited = hs.Sequenced([hs.route_status(429, {"Retry-After": "10"}), hs.route_ok(JPEG)])
    settings = replace(SETTINGS, fetch=replace(FETCH, host_queue_timeout=5))
    done, asked = run_virtual(lambda: _queued_behind(settings, limited, 0, 0))  # type: ignore[misc]
    assert done["/first"][0] is Outcome.HTTP_429
    assert asked == ["/first"]


def test_per_host_1_on_a_real_server_times_out_no_url_it_did_not_request(
        tmp_path: Path) -> None:
    """``pairfarm download --per-host 1``: 200 URLs of one host, a slow one first (it
    answers after 60 s, past the 4 s deadline); every URL that ends ``timeout`` was
    requested from the server."""
    slow = hs.route_slow_first_byte(60, JPEG)
    with hs.server_thread({"/slow": slow}, fallback=hs.route_ok(JPEG)) as server:
        urls = [f"http://127.0.0.1:{server.port}/slow",
                *(f"http://127.0.0.1:{server.port}/q{i}" for i in range(199))]
        (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
        run_cli("download", str(tmp_path / "urls.txt"), "-o", str(tmp_path / "out"),
                "--allow-cidr", "127.0.0.0/8", "--no-progress", "--per-host", "1",
                "--deadline", "4", timeout=240)
        asked = {f"http://127.0.0.1:{server.port}{request.path}" for request in server.requests}
    rows = pq.read_table(tmp_path / "out" / "00000000.parquet").to_pylist()
    outcomes = {row["url"]: row["error_class"] or "ok" for row in rows}
    assert outcomes[urls[0]] == "timeout"
    assert {url for url, outcome in outcomes.items() if outcome == "timeout"} <= asked
    assert len(rows) == 200 and "host_busy" not in outcomes.values()


def test_bodies_past_the_cap_sharing_a_small_body_budget_all_end_too_large() -> None:
    """Room for two capped bodies, eight readers of 50 MB bodies without a length (and
    gzip bombs): each grows to the cap, fails there and gives its bytes back; a body at
    the cap that reads on waits for nothing (it once waited for the grow lock, held by a
    body waiting for its bytes: a deadlock)."""
    routes = {"/chunked": hs.route_stream(50 * 1024 * 1024, declare=False),
              "/gzip": hs.route_ok(GZIP_BOMB, headers={"Content-Encoding": "gzip"})}
    fetch = replace(FETCH, concurrency=8, body_memory_bytes=2 * FETCH.max_body_bytes)

    async def main() -> list[Outcome]:
        dns, dialer = hs.fake_network()
        found: list[Outcome] = []

        async def one(stage: Stage, url: str) -> None:
            found.append((await _one(stage, url))[0])

        async with trio.open_nursery() as nursery:
            server = await hs.start_server(nursery, routes)
            with trio.fail_after(600):
                async with (open_stage(replace(SETTINGS, fetch=fetch),
                                       Network(resolver=dns, dialer=dialer)) as stage,
                            trio.open_nursery() as fetches):
                    for n in range(16):
                        fetches.start_soon(one, stage, server.url(list(routes)[n % 2]))
            nursery.cancel_scope.cancel()
        return found

    found = run_virtual(main)
    # every fetch ends (a deadlock raises TooSlowError); the mock clock may jump past a
    # read timeout while loopback moves 16 MB, so a timeout is allowed as well
    assert len(found) == 16 and set(found) <= {Outcome.TOO_LARGE, Outcome.TIMEOUT}  # type: ignore[arg-type]


@pytest.mark.parametrize(("args", "expected"), [
    ((), ["opted_out", "opted_out", "opted_out", "ok"]),
    (("--disallowed-header-directives", ""), ["ok", "ok", "opted_out", "ok"]),
    (("--disallowed-header-directives", "NoArchive noml"), ["ok", "opted_out", "opted_out",
                                                            "opted_out"]),
    (("--no-tdm-reservation",), ["opted_out", "opted_out", "ok", "ok"]),
])
def test_opt_out_signals_from_the_command_line(tmp_path: Path, args: tuple[str, ...],
                                               expected: list[str]) -> None:
    routes = {"/noai.jpg": hs.route_ok(JPEG, headers={"X-Robots-Tag": "noai"}),
              "/noml.jpg": hs.route_ok(JPEG, headers={"X-Robots-Tag": "noml"}),
              "/tdm.jpg": hs.route_ok(JPEG, headers={"tdm-reservation": "1"}),
              "/noarchive.jpg": hs.route_ok(JPEG, headers={"X-Robots-Tag": "noarchive"})}
    with hs.server_thread(routes) as server:
        urls = [f"http://127.0.0.1:{server.port}{path}" for path in routes]
        (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
        run_cli("download", str(tmp_path / "urls.txt"), "-o", str(tmp_path / "out"),
                "--allow-cidr", "127.0.0.0/8", "--no-progress", *args)
    rows = pq.read_table(tmp_path / "out" / "00000000.parquet").to_pylist()
    assert [row["error_class"] or "ok" for row in rows] == expected
