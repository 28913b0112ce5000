"""Pure logic of the worker: opt-out headers, capped decoders, backoff, Retry-After."""

from __future__ import annotations

import gzip
import random
import zlib
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import brotli
import pytest
import trio
import trio.testing

from worker.backoff import backoff_delay, parse_retry_after
from worker.budget import BodyBudget, ByteBudget
from worker.decoding import BodyTooLarge, CappedBody, DecodeFailure, decoder_for
from worker.errors import SettingsError
from worker.resolver import CachingResolver, SystemResolver
from worker.robots import DEFAULT_DISALLOWED_DIRECTIVES, opt_out_directive, tdm_reserved
from worker.settings import FetchSettings, ImageSettings


@pytest.mark.parametrize(("values", "found"), [
    (["noai"], "noai"),
    (["noarchive, NoImageAI"], "noimageai"),
    (["noindex"], "noindex"),
    (["none"], "none"),
    (["pairfarm: noai"], "noai"),
    (["PairFarm: noimageindex, nofollow"], "noimageindex"),
    (["otherbot: noai"], None),
    (["otherbot: noai, noimageai"], None),
    (["otherbot: noai", "nofollow"], None),
    (["otherbot: noindex, pairfarm: noai"], "noai"),
    (["unavailable_after: 25 Jun 2010 15:00:00 PST"], None),
    (["max-image-preview: large, noai"], "noai"),
    (["nofollow, noarchive"], None),
    (["noml"], "noml"),
    (["pairfarm: NoML"], "noml"),
    ([], None),
])
def test_x_robots_tag(values: list[str], found: str | None) -> None:
    assert opt_out_directive(values, "pairfarm") == found


def test_the_default_directives_are_img2datasets_and_noml() -> None:
    assert DEFAULT_DISALLOWED_DIRECTIVES == ("noai", "noimageai", "noindex", "noimageindex",
                                             "noml")


@pytest.mark.parametrize(("values", "disallowed", "found"), [
    (["noai, noindex"], (), None),  # --disallowed-header-directives ''
    (["noindex"], ("noai",), None),
    (["none"], ("noai",), None),  # none is noindex, nofollow
    (["none"], ("nofollow",), "none"),
    (["noarchive"], ("noarchive",), "noarchive"),
    (["otherbot: noarchive"], ("noarchive",), None),
    (["mybot: noai"], ("noai",), None),  # another agent's token than ours
])
def test_x_robots_tag_with_chosen_directives(values: list[str], disallowed: tuple[str, ...],
                                             found: str | None) -> None:
    assert opt_out_directive(values, "pairfarm", disallowed) == found


@pytest.mark.parametrize(("values", "reserved"), [
    (["1"], True), ([" 1 "], True), (["0"], False), ([], False), (["yes"], False),
    (["0", "1"], True),
])
def test_tdm_reservation(values: list[str], reserved: bool) -> None:
    assert tdm_reserved(values) is reserved


@pytest.mark.parametrize("directive", ["No AI", "noai,", "x:y", ""])
def test_malformed_directives_are_refused(directive: str) -> None:
    with pytest.raises(SettingsError, match="directive"):
        FetchSettings(disallowed_directives=(directive,))


def _decode(encoding: str, data: bytes, cap: int, feed: int = 16384) -> bytes:
    body = CappedBody(decoder_for(encoding), cap)
    for i in range(0, len(data), feed):
        body.feed(data[i:i + feed])
    return body.finish()


PAYLOAD = random.Random(1).randbytes(300_000)


@pytest.mark.parametrize(("encoding", "encode"), [
    ("gzip", gzip.compress), ("x-gzip", gzip.compress), ("deflate", zlib.compress),
    ("deflate", lambda d: zlib.compress(d)[2:-4]),  # raw deflate, as some servers send
    ("br", brotli.compress), ("", lambda d: d), ("identity", lambda d: d),
])
def test_decoders_round_trip(encoding: str, encode: object) -> None:
    assert callable(encode)
    assert _decode(encoding, encode(PAYLOAD), cap=len(PAYLOAD)) == PAYLOAD


@pytest.mark.parametrize(("encoding", "encode"), [
    ("gzip", gzip.compress), ("deflate", zlib.compress), ("br", brotli.compress),
])
def test_bombs_stop_at_the_cap_in_bounded_steps(encoding: str, encode: object) -> None:
    assert callable(encode)
    bomb = encode(b"\0" * (64 * 1024 * 1024))
    body = CappedBody(decoder_for(encoding), 1024 * 1024)
    with pytest.raises(BodyTooLarge):
        body.feed(bomb)
    # never more than the cap plus one bounded step (brotli grows its buffer in blocks)
    assert body.size <= 1024 * 1024 + 512 * 1024


def test_corrupt_and_unknown_codings_fail_clearly() -> None:
    with pytest.raises(DecodeFailure):
        _decode("gzip", b"not gzip at all" * 100, cap=10**6)
    with pytest.raises(DecodeFailure):
        decoder_for("zstd-but-unknown")
    with pytest.raises(DecodeFailure):
        decoder_for("gzip, br")


def test_backoff_is_capped_jittered_and_growing() -> None:
    rng = random.Random(0)
    delays = [backoff_delay(n, base=1, cap=60, rng=rng) for n in range(12)]
    for n, delay in enumerate(delays):
        ceiling = min(60, 2**n)
        assert ceiling / 2 <= delay <= ceiling
    assert len({round(d, 6) for d in delays[7:]}) > 1  # capped, still jittered


def test_retry_after_forms() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after("120") == 120
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30)), now) == 30
    assert parse_retry_after(format_datetime(now - timedelta(seconds=30)), now) == 0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_byte_budget_never_lends_more_than_it_has_and_serves_in_order() -> None:
    async def main() -> tuple[list[str], int]:
        budget, log, held, peak = ByteBudget(100), [], [0], [0]

        async def holder(name: str, size: int, hold: float) -> None:
            async with budget.hold(size):
                held[0] += min(size, 100)
                peak[0] = max(peak[0], held[0])
                log.append(f"{name}+")
                await trio.sleep(hold)
                held[0] -= min(size, 100)
            log.append(f"{name}-")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder, "a", 70, 5)
            await trio.sleep(1)
            nursery.start_soon(holder, "b", 50, 1)
            await trio.sleep(1)
            nursery.start_soon(holder, "c", 30, 1)  # fits now, but b came first
            await trio.sleep(1)
            nursery.start_soon(holder, "huge", 10_000, 1)  # capped to the whole budget
        return log, peak[0]

    log, peak = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert peak <= 100
    # c fitted beside a, but b (queued first) did not: c waited behind b until a left
    assert log.index("a-") < min(log.index("b+"), log.index("c+"))
    assert max(log.index("b-"), log.index("c-")) < log.index("huge+")
    assert sorted(log) == sorted(f"{n}{s}" for n in ("a", "b", "c", "huge") for s in "+-")


def test_a_cancelled_waiter_takes_nothing_and_lets_the_next_in() -> None:
    async def main() -> list[str]:
        budget, log, big = ByteBudget(100), [], trio.CancelScope()
        await budget.take(80)

        async def waiter(name: str, size: int, scope: trio.CancelScope) -> None:
            with scope:
                await budget.take(size)
                log.append(name)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter, "big", 90, big)
            await trio.sleep(1)
            nursery.start_soon(waiter, "small", 20, trio.CancelScope())  # queued behind
            await trio.sleep(1)
            assert log == []
            big.cancel()
        return [*log, f"free {budget.free}"]

    assert trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) == [
        "small", "free 0"]


def test_half_read_bodies_of_unknown_length_cannot_deadlock_the_body_budget() -> None:
    """64 readers of chunked 10 MB bodies share 160 MB: each takes its start, and
    grows to the cap one at a time; all finish, the budget never lends more than it has."""
    cap, total, readers = 16 << 20, 160 << 20, 64

    async def main() -> tuple[int, int]:
        budget, done, peak = BodyBudget(total, cap, readers), [0], [0]

        async def read(n: int) -> None:
            held = await budget.reserve(None)
            size = 0
            while size < 10 << 20:  # 1 MB a second
                if size + (1 << 20) > held.size:
                    await budget.grow(held, None)
                size += 1 << 20
                peak[0] = max(peak[0], total - budget.free)
                await trio.sleep(1)
            held.shrink_to(size)
            await trio.sleep(3)  # waiting for a decode
            held.release()
            done[0] += 1

        async with trio.open_nursery() as nursery:
            for n in range(readers):
                nursery.start_soon(read, n)
        return done[0], peak[0]

    done, peak = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert done == readers and peak <= total


def test_a_body_budget_must_hold_two_bodies() -> None:
    with pytest.raises(ValueError, match="two"):
        BodyBudget(20 << 20, 16 << 20, 8)
    with pytest.raises(SettingsError, match="two bodies"):
        FetchSettings(max_body_bytes=100 << 20)


def test_dns_timeout_and_cache_on_a_fake_clock() -> None:
    class Hanging:
        calls = 0

        async def resolve(self, host: str) -> list[object]:
            Hanging.calls += 1
            await trio.sleep_forever()
            raise AssertionError

    class Bounded(SystemResolver):
        async def _lookup(self, host: str) -> list[object]:  # type: ignore[override]
            return await Hanging().resolve(host)  # type: ignore[return-value]

    async def main() -> tuple[float, str]:
        resolver = CachingResolver(Bounded(timeout=5))
        start = trio.current_time()
        messages = []
        for _ in range(3):
            try:
                await resolver.resolve("slow.example.test")
            except Exception as exc:  # DNSFailure, cached after the first timeout
                messages.append(str(exc))
        return trio.current_time() - start, messages[-1]

    elapsed, message = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert elapsed == 5 and Hanging.calls == 1
    assert "no answer within 5s" in message


def test_settings_refuse_nonsense() -> None:
    with pytest.raises(SettingsError):
        FetchSettings(deadline=0)
    with pytest.raises(SettingsError):
        ImageSettings(resize_mode="stretch")
    with pytest.raises(SettingsError):
        ImageSettings(quality=101)


def test_accept_names_only_formats_the_worker_decodes() -> None:
    from worker.settings import SAFE_FORMATS
    from worker.transport import accept_header

    accept = accept_header(SAFE_FORMATS)
    assert "image/avif" not in accept  # a CDN would answer AVIF, which the decoder refuses
    assert accept.split(",") == ["image/jpeg", "image/png", "image/webp", "image/gif",
                                 "image/bmp", "image/*;q=0.8"]
    assert accept_header(("JPEG",)) == "image/jpeg,image/*;q=0.8"
