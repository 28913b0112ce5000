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
from worker.budget import ByteBudget
from worker.decoding import BodyTooLarge, CappedBody, DecodeFailure, decoder_for
from worker.errors import SettingsError
from worker.resolver import CachingResolver, SystemResolver
from worker.robots import opt_out_directive
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
    ([], None),
])
def test_x_robots_tag(values: list[str], found: str | None) -> None:
    assert opt_out_directive(values, "pairfarm") == found


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


def test_byte_budget_blocks_until_bytes_are_returned() -> None:
    async def main() -> list[str]:
        budget, log = ByteBudget(100), []

        async def holder(name: str, size: int, hold: float) -> None:
            async with budget.hold(size):
                log.append(f"{name}+")
                await trio.sleep(hold)
            log.append(f"{name}-")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder, "a", 70, 5)
            await trio.sleep(1)
            nursery.start_soon(holder, "b", 50, 1)
            await trio.sleep(1)
            nursery.start_soon(holder, "huge", 10_000, 1)  # capped to the whole budget
        return log

    log = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert log == ["a+", "a-", "b+", "b-", "huge+", "huge-"]


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
