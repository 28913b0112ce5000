"""The run loop against a scripted coordinator that speaks the protocol (``pairfarm.protocol``).

The coordinator here is an ``httpx.MockTransport`` handler that validates every request
body with the protocol's models and answers with them, so the worker's side of the
contract is checked exactly; candidate images come from the hostile test server through
the fake network (SSRF guard on). Time is a ``MockClock``: heartbeats, backoff and the
drain timeout run in virtual time (the clock jumps when every task has waited 0.3 s).
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fsspec
import httpx
import pytest
import trio
import trio.testing

from pairfarm.client import AsyncCoordinatorClient
from pairfarm.protocol import (
    API_PREFIX,
    BatchState,
    BatchStatus,
    Candidate,
    DownloadLease,
    DownloadReport,
    FailCause,
    FailReport,
    Heartbeat,
    HeartbeatResponse,
    LeaseRequest,
    RegisterRequest,
    RegisterResponse,
    Role,
)
from tests import hostile_server as hs
from worker.batch import Network
from worker.metrics import WorkerMetrics, build_metrics
from worker.pipeline import BatchRun, SharedPipeline
from worker.runloop import RunLoop, WorkerStopped
from worker.settings import FetchSettings, PipelineSettings, RunSettings

JPEG = hs.jpeg_bytes(400, 300)


@dataclass
class ScriptedCoordinator:
    """The coordinator's download API, in memory; ``script`` bends its answers."""

    batches: list[list[str]]
    heartbeat_s: float = 5.0
    down_calls: int = 0  # the first N requests fail with 503
    lose_lease_of: set[int] = field(default_factory=set)
    token: str = "secret"
    calls: list[str] = field(default_factory=list)
    completed: dict[int, DownloadReport] = field(default_factory=dict)
    failed: dict[int, FailReport] = field(default_factory=dict)
    heartbeats: list[tuple[float, int]] = field(default_factory=list)
    #: called on register, and on each lease with the batch's number (1, 2, ...)
    on_register: Callable[[], None] | None = None
    on_lease: Callable[[int], None] | None = None
    #: the first N leases answer 429 (a quarantine) with Retry-After: 120
    refuse_leases: int = 0
    lease_times: list[float] = field(default_factory=list)
    #: each lease request's ``ahead`` flag
    lease_ahead: list[bool] = field(default_factory=list)
    #: refuse (204) a lease-ahead that would take the last batch, as the coordinator does
    keep_last: bool = False
    #: the lease requests (0-based) answered 204 whatever is left: an empty queue
    empty_at: set[int] = field(default_factory=set)
    _next: int = 0

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix(API_PREFIX)
        self.calls.append(path)
        await trio.lowlevel.checkpoint()
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return httpx.Response(401, json={"error": "unauthorized", "detail": "bad token"})
        if self.down_calls > 0:
            self.down_calls -= 1
            return httpx.Response(503, json={"error": "unavailable", "detail": "db down"})
        body = json.loads(request.content or b"null")
        return self._route(path, body)

    def _route(self, path: str, body: Any) -> httpx.Response:
        if path == "/register":
            RegisterRequest.model_validate(body)
            if self.on_register is not None:
                self.on_register()
            return _ok(RegisterResponse(worker_id=1, role=Role.WORKER, batch_size=10,
                                        lease_ttl_s=60, heartbeat_interval_s=self.heartbeat_s))
        if path == "/download/lease":
            request = LeaseRequest.model_validate(body)
            self.lease_ahead.append(request.ahead)
            return self._lease(request.ahead)
        batch_id = int(path.split("/")[2])
        action = path.split("/")[3]
        return getattr(self, f"_{action}")(batch_id, body)

    def _lease(self, ahead: bool) -> httpx.Response:
        self.lease_times.append(trio.current_time())
        if len(self.lease_times) - 1 in self.empty_at:
            return httpx.Response(204)
        if self.refuse_leases > 0:
            self.refuse_leases -= 1
            return httpx.Response(429, headers={"Retry-After": "120"}, json={
                "error": "quarantined", "detail": "this worker is quarantined for 120 s"})
        if self._next >= len(self.batches) or (
                self.keep_last and ahead and self._next == len(self.batches) - 1):
            return httpx.Response(204)
        urls = self.batches[self._next]
        self._next += 1
        if self.on_lease is not None:
            self.on_lease(self._next)
        lease = DownloadLease(
            batch_id=self._next, lease_token=f"lt-{self._next}", attempt=1,
            lease_expires_at=datetime.now(UTC) + timedelta(seconds=60),
            candidates=[Candidate(id=100 * self._next + i, url=u, caption=f"c{i}")
                        for i, u in enumerate(urls)])
        return _ok(lease)

    def _heartbeat(self, batch_id: int, body: Any) -> httpx.Response:
        Heartbeat.model_validate(body)
        self.heartbeats.append((trio.current_time(), batch_id))
        if batch_id in self.lose_lease_of:
            return httpx.Response(409, json={"error": "lease_lost", "detail": "reaped"})
        return _ok(HeartbeatResponse(lease_expires_at=datetime.now(UTC)))

    def _complete(self, batch_id: int, body: Any) -> httpx.Response:
        report = DownloadReport.model_validate(body)
        if batch_id in self.lose_lease_of:
            return httpx.Response(409, json={"error": "lease_lost", "detail": "reaped"})
        self.completed[batch_id] = report
        return _ok(BatchState(batch_id=batch_id, status=BatchStatus.DOWNLOADED, attempts=1))

    def _fail(self, batch_id: int, body: Any) -> httpx.Response:
        self.failed[batch_id] = FailReport.model_validate(body)
        return _ok(BatchState(batch_id=batch_id, status=BatchStatus.PENDING, attempts=0))


def _ok(model: Any) -> httpx.Response:
    return httpx.Response(200, json=model.model_dump(mode="json"))


def _settings(**overrides: Any) -> RunSettings:
    pipeline = PipelineSettings(fetch=FetchSettings(deadline=20, read_timeout=10),
                                decode_threads=1)
    base: dict[str, Any] = {"coordinator_url": "http://coordinator.test", "token": "secret",
                            "output": "unused", "name": "w1", "pipeline": pipeline,
                            "exit_when_idle": True, "backoff_base_s": 1, "backoff_cap_s": 30}
    return RunSettings(**{**base, **overrides})


Scenario = Callable[[RunLoop, hs.HostileServer], Awaitable[None]]


def _run(coordinator: ScriptedCoordinator, out: Path, settings: RunSettings | None = None,
         during: Scenario | None = None, paths: list[list[str]] | None = None, *,
         metrics: WorkerMetrics | None = None) -> RunLoop:
    async def main() -> RunLoop:
        dns, dialer = hs.fake_network()
        routes = {"/a.jpg": hs.route_ok(JPEG), "/b.jpg": hs.route_ok(JPEG),
                  "/slow.jpg": hs.route_slow_first_byte(8, JPEG), "/404": hs.route_status(404)}
        async with trio.open_nursery() as nursery:
            server = await hs.start_server(nursery, routes)
            coordinator.batches = [[server.url(p) for p in batch] for batch in paths or []]
            run_settings = settings or _settings()
            client = AsyncCoordinatorClient("http://coordinator.test", run_settings.token,
                                            transport=coordinator.transport())
            loop = RunLoop(run_settings, client, fsspec.filesystem("file"), str(out),
                           network=Network(resolver=dns, dialer=dialer),
                           rng=random.Random(0), metrics=metrics)
            if during is not None:
                nursery.start_soon(during, loop, server)
            try:
                await loop.run()
            except WorkerStopped as exc:
                stopped.append(exc)
            await client.aclose()
            nursery.cancel_scope.cancel()
        return loop

    stopped: list[WorkerStopped] = []
    # The clock jumps only after 0.3 s of real idleness: decode and file threads finish
    # well within that, so virtual time does not race ahead while a thread works.
    result = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.3))
    if stopped:
        raise stopped[0]
    assert isinstance(result, RunLoop)
    return result


def _public_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) \
        if out.exists() else []


def test_batches_are_downloaded_completed_and_reported(tmp_path: Path) -> None:
    coord = ScriptedCoordinator(batches=[])
    loop = _run(coord, tmp_path, paths=[["/a.jpg", "/404", "/b.jpg"], ["/slow.jpg", "/a.jpg"]])
    assert loop.summary.batches_completed == 2
    assert coord.completed[1].outcomes == {"ok": 2, "http_4xx": 1}
    assert coord.completed[2].outcomes == {"ok": 2}
    assert coord.completed[1].lease_token == "lt-1"
    assert coord.completed[1].shard.tar.endswith("00000001.tar")
    assert _public_files(tmp_path) == ["00000001.parquet", "00000001.tar",
                                       "00000001_stats.json", "00000002.parquet",
                                       "00000002.tar", "00000002_stats.json"]
    # lease-ahead: batch 2 was leased during batch 1; the 204 to the lease-ahead during
    # batch 2 is asked again (not ahead) once batch 2 ended, and that 204 ends the run
    assert coord.lease_ahead == [False, True, True, False]
    assert coord.calls[-1] == "/download/lease"


def test_a_refused_lease_ahead_is_asked_again_once_the_batch_in_hand_ended(
        tmp_path: Path) -> None:
    """The coordinator keeps the last batch from a worker that still holds one: the
    worker asks for it again, not ahead, once its batch completed, and downloads it."""
    coord = ScriptedCoordinator(batches=[], keep_last=True)
    loop = _run(coord, tmp_path, paths=[["/a.jpg", "/b.jpg"], ["/a.jpg"]])
    assert loop.summary.batches_completed == 2 and sorted(coord.completed) == [1, 2]
    # batch 2's own tail asks ahead too (refused: nothing left), then once more at its end
    assert coord.lease_ahead == [False, True, False, True, False]
    # the refused lease-ahead (the 2nd) did not make the worker exit, and batch 2 was
    # leased only after batch 1 completed
    assert coord.calls.index("/download/1/complete") < coord.calls.index("/download/2/complete")
    third = [i for i, c in enumerate(coord.calls) if c == "/download/lease"][2]
    assert coord.calls.index("/download/1/complete") < third


def test_heartbeats_run_while_a_batch_is_in_hand(tmp_path: Path) -> None:
    coord = ScriptedCoordinator(batches=[], heartbeat_s=3)
    _run(coord, tmp_path, paths=[["/slow.jpg"]])
    # the slow image takes 8 virtual seconds: beats at 3 and 6, the fence before the rename
    assert [batch for _, batch in coord.heartbeats] == [1, 1, 1]
    assert [round(t) for t, _ in coord.heartbeats] == [3, 6, 8]
    # the 204 to the lease-ahead came during the batch; asked again after it, not ahead
    assert coord.calls[-2:] == ["/download/1/complete", "/download/lease"]
    assert coord.lease_ahead == [False, True, False]


def test_lost_lease_discards_the_work(tmp_path: Path) -> None:
    coord = ScriptedCoordinator(batches=[], heartbeat_s=3, lose_lease_of={1})
    loop = _run(coord, tmp_path, paths=[["/slow.jpg", "/a.jpg"], ["/a.jpg"]])
    assert loop.summary.batches_lost == 1 and 1 not in coord.completed
    assert coord.completed[2].outcomes == {"ok": 1}
    assert _public_files(tmp_path) == ["00000002.parquet", "00000002.tar",
                                       "00000002_stats.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp files gone


def test_coordinator_down_is_retried_with_backoff_and_the_batch_kept(tmp_path: Path) -> None:
    coord = ScriptedCoordinator(batches=[], down_calls=4)
    loop = _run(coord, tmp_path, paths=[["/a.jpg"]])
    assert loop.summary.batches_completed == 1
    assert coord.calls[:5] == ["/register"] * 5  # 4 refused, the 5th accepted
    assert coord.completed[1].outcomes == {"ok": 1}


def test_backoff_waits_grow_and_stay_capped(tmp_path: Path) -> None:
    coord = ScriptedCoordinator(batches=[], down_calls=8)
    times: list[float] = []
    original = coord.handle

    async def timed(request: httpx.Request) -> httpx.Response:
        times.append(trio.current_time())
        return await original(request)

    coord.handle = timed  # type: ignore[method-assign]
    _run(coord, tmp_path, settings=_settings(backoff_cap_s=10), paths=[])
    gaps = [b - a for a, b in itertools.pairwise(times[:9])]  # 8 refusals, then success
    for attempt, gap in enumerate(gaps):
        ceiling = min(10, 2**attempt)
        assert ceiling / 2 <= gap <= ceiling + 1e-9


def test_first_sigterm_finishes_the_batches_then_stops_leasing(tmp_path: Path) -> None:
    coord = ScriptedCoordinator(batches=[])

    async def stop_soon(loop: RunLoop, server: hs.HostileServer) -> None:
        await trio.sleep(2)  # both slow images (batch 2 leased ahead) are in flight
        loop.request_stop()

    loop = _run(coord, tmp_path, settings=_settings(exit_when_idle=False), during=stop_soon,
                paths=[["/slow.jpg"], ["/slow.jpg"], ["/a.jpg"]])
    assert sorted(coord.completed) == [1, 2] and loop.summary.batches_completed == 2
    assert coord.calls.count("/download/lease") == 2  # batch 3 was never leased


def test_first_sigterm_releases_a_batch_leased_ahead_that_has_not_started(
        tmp_path: Path) -> None:
    """One fetch slot: batch 2, leased during batch 1's slow tail, waits for it. The first
    signal releases batch 2 at once (no attempt spent) and lets batch 1 finish."""
    coord = ScriptedCoordinator(batches=[])
    times: dict[str, float] = {}

    async def stop_soon(loop: RunLoop, server: hs.HostileServer) -> None:
        await trio.sleep(2)
        loop.request_stop()
        times["signal"] = trio.current_time()

    pipeline = PipelineSettings(fetch=FetchSettings(deadline=20, read_timeout=10,
                                                    concurrency=1), decode_threads=1)
    original = coord._fail

    def timed_fail(batch_id: int, body: Any) -> httpx.Response:
        times[f"fail {batch_id}"] = trio.current_time()
        return original(batch_id, body)

    coord._fail = timed_fail  # type: ignore[method-assign]
    loop = _run(coord, tmp_path, during=stop_soon, paths=[["/slow.jpg"], ["/a.jpg"]],
                settings=_settings(exit_when_idle=False, pipeline=pipeline))
    assert list(coord.completed) == [1] and loop.summary.batches_completed == 1
    assert coord.failed[2].release and loop.summary.batches_released == 1
    assert times["fail 2"] - times["signal"] < 0.5  # at once, not after batch 1's tail


def test_second_sigterm_releases_the_batch_unfinished(tmp_path: Path) -> None:
    coord = ScriptedCoordinator(batches=[])

    async def stop_twice(loop: RunLoop, server: hs.HostileServer) -> None:
        await trio.sleep(2)
        loop.request_stop()
        loop.request_stop()

    loop = _run(coord, tmp_path, settings=_settings(exit_when_idle=False), during=stop_twice,
                paths=[["/slow.jpg", "/a.jpg"]])
    assert coord.completed == {} and loop.summary.batches_released == 1
    assert coord.failed[1].release is True and coord.failed[1].lease_token == "lt-1"
    assert not list(tmp_path.iterdir()) or _public_files(tmp_path) == []


def test_drain_timeout_releases_a_batch_that_takes_too_long(tmp_path: Path) -> None:
    coord = ScriptedCoordinator(batches=[])

    async def stop(loop: RunLoop, server: hs.HostileServer) -> None:
        await trio.sleep(1)
        loop.request_stop()

    loop = _run(coord, tmp_path, during=stop, paths=[["/slow.jpg"]],
                settings=_settings(exit_when_idle=False, drain_timeout_s=3))
    assert loop.summary.batches_released == 1 and coord.failed[1].release


def test_a_refused_token_stops_the_worker(tmp_path: Path) -> None:
    coord = ScriptedCoordinator(batches=[], token="other")
    with pytest.raises(WorkerStopped, match="refused this worker's token"):
        _run(coord, tmp_path, settings=_settings(token="secret"), paths=[])


def _every_file(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("*")) if out.is_dir() else []


@pytest.mark.parametrize("heartbeat_s", [1, 100], ids=["on_a_heartbeat", "on_the_fence"])
def test_a_token_revoked_mid_batch_stops_the_worker_and_leaves_no_partial_file(
        tmp_path: Path, heartbeat_s: float) -> None:
    """Revoked while the slow image is in flight: refused on the next heartbeat (every
    1 s) or on the fence before the rename (heartbeats every 100 s)."""
    coord = ScriptedCoordinator(batches=[], heartbeat_s=heartbeat_s)

    async def revoke(loop: RunLoop, server: hs.HostileServer) -> None:
        await trio.sleep(2)  # the slow image (8 s) is in flight
        coord.token = "revoked"

    with pytest.raises(WorkerStopped, match=r"refused this worker's token \(revoked\?\)"):
        _run(coord, tmp_path, during=revoke, paths=[["/slow.jpg", "/a.jpg"]])
    assert coord.completed == {} and coord.failed == {}
    assert _every_file(tmp_path) == []  # no .tmp tar, no shard


def test_an_unwritable_output_stops_the_worker_before_it_registers(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.touch()
    coord = ScriptedCoordinator(batches=[])
    with pytest.raises(WorkerStopped, match=r"cannot write shards to .*File exists"):
        _run(coord, afile, paths=[["/a.jpg"], ["/b.jpg"]])
    assert coord.calls == []  # no batch leased, none failed


def _turn_into_a_file(out: Path) -> None:
    """Put the output directory (and the shards in it) aside and a file in its place."""
    out.rename(out.with_name("aside"))
    out.write_bytes(b"")


def _turn_into_a_directory(out: Path) -> None:
    out.unlink()
    out.with_name("aside").rename(out)


def test_failures_on_this_machine_spend_no_attempt_and_stop_the_worker(tmp_path: Path) -> None:
    """The output directory becomes a file once the worker registered (as a disk that
    fails mid-run): each batch fails here, is given back with cause "worker", and the
    third in a row stops the worker; batches 4 and 5 are never leased."""
    out = tmp_path / "shards"
    coord = ScriptedCoordinator(batches=[], on_register=lambda: _turn_into_a_file(out))
    with pytest.raises(WorkerStopped, match=r"stopping: 3 batches in a row failed on this "
                                            r"machine: shard write failed: .*File exists"):
        _run(coord, out, paths=[["/a.jpg"], ["/b.jpg"], ["/a.jpg"], ["/b.jpg"], ["/a.jpg"]])
    assert sorted(coord.failed) == [1, 2, 3]
    assert {(r.cause, r.release) for r in coord.failed.values()} == {(FailCause.WORKER, False)}
    assert coord.calls.count("/download/lease") == 3 and coord.completed == {}


def test_a_completed_batch_resets_the_count_of_failures_here(tmp_path: Path) -> None:
    """Odd batches fail here, even ones complete: never two failures in a row."""
    out = tmp_path / "shards"

    def flip(batch: int) -> None:
        (_turn_into_a_file if batch % 2 else _turn_into_a_directory)(out)

    coord = ScriptedCoordinator(batches=[], on_lease=flip)
    # flipping the output on each lease needs the batches one after the other
    loop = _run(coord, out, settings=_settings(stop_after_failures=2, lease_ahead_at=0),
                paths=[["/a.jpg"], ["/b.jpg"], ["/a.jpg"], ["/b.jpg"], ["/a.jpg"]])
    assert sorted(coord.failed) == [1, 3, 5] and sorted(coord.completed) == [2, 4]
    assert loop.summary.batches_failed == 3
    assert {r.cause for r in coord.failed.values()} == {FailCause.WORKER}


class _Unreachable:
    """The coordinator's failure modes while a worker holds no batch."""

    @staticmethod
    async def register_503(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"error": "unavailable", "detail": "db down"})

    @staticmethod
    async def register_hangs(request: httpx.Request) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    @staticmethod
    async def lease_503(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/register"):
            return _ok(RegisterResponse(worker_id=1, role=Role.WORKER, batch_size=10,
                                        lease_ttl_s=60, heartbeat_interval_s=5))
        return httpx.Response(503, json={"error": "unavailable", "detail": "db down"})

    @staticmethod
    async def idle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/register"):
            return await _Unreachable.lease_503(request)
        return httpx.Response(204)


@pytest.mark.parametrize("mode", ["register_503", "register_hangs", "lease_503", "idle"])
def test_the_first_signal_stops_a_worker_that_holds_no_batch_at_once(
        tmp_path: Path, mode: str) -> None:
    """Backoff capped at 30 s, idle polls every 60 s: the signal at t=100 must end the run
    at t=100, not at the next retry (the run is given an hour of virtual time)."""
    ended: list[float] = []
    requests: list[float] = []
    handler = getattr(_Unreachable, mode)

    async def counted(request: httpx.Request) -> httpx.Response:
        requests.append(trio.current_time())
        return await handler(request)  # type: ignore[no-any-return]

    async def main() -> None:
        client = AsyncCoordinatorClient("http://coordinator.test", "secret",
                                        transport=httpx.MockTransport(counted))
        loop = RunLoop(_settings(exit_when_idle=False, idle_poll_s=60), client,
                       fsspec.filesystem("file"), str(tmp_path), rng=random.Random(0))

        async def stop_later() -> None:
            await trio.sleep(100)
            loop.request_stop()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_later)
            with trio.move_on_after(3600):
                await loop.run()
                ended.append(trio.current_time())
        await client.aclose()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.3))
    assert ended == [100.0]
    assert requests and max(requests) < 100  # nothing asked after the signal


def test_idle_polls_double_up_to_the_cap_and_start_over_after_a_lease(tmp_path: Path) -> None:
    """Leases 0-3 and 5-6 find the queue empty: the waits before the next lease double from
    --idle-poll (10 s) to --idle-poll-max (30 s), half fixed and half random, and a lease
    that got a batch starts them over."""
    coord = ScriptedCoordinator(batches=[], empty_at={0, 1, 2, 3, 5, 6})
    settings = _settings(exit_when_idle=False, idle_poll_s=10, idle_poll_max_s=30,
                         lease_ahead_at=0, max_batches=2)
    loop = _run(coord, tmp_path, settings, paths=[["/a.jpg"], ["/b.jpg"]])
    assert loop.summary.batches_completed == 2
    t = coord.lease_times
    assert len(t) == 8
    waits = [t[1] - t[0], t[2] - t[1], t[3] - t[2], t[4] - t[3], t[6] - t[5], t[7] - t[6]]
    ceilings = [10, 20, 30, 30, 10, 20]  # min(cap, 10 * 2**n); n back to 0 after lease 4
    for wait, ceiling in zip(waits, ceilings, strict=True):
        assert ceiling / 2 <= wait <= ceiling + 0.5, (waits, ceilings)
    assert t[5] - t[4] < 5, "the lease after a batch ended waits for no poll"


def test_a_quarantined_worker_waits_out_the_retry_after_then_leases(tmp_path: Path) -> None:
    coord = ScriptedCoordinator(batches=[], refuse_leases=2)
    loop = _run(coord, tmp_path, paths=[["/a.jpg"]])
    assert loop.summary.batches_completed == 1
    assert [round(t) for t in coord.lease_times[:3]] == [0, 120, 240]


# -- lease-ahead ------------------------------------------------------------------------

def _slow_leases(coord: ScriptedCoordinator, seconds: float) -> None:
    """Every lease answer takes ``seconds`` (a busy coordinator, a long batch query)."""
    original = coord.handle

    async def slow(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/download/lease"):
            await trio.sleep(seconds)
        return await original(request)

    coord.handle = slow  # type: ignore[method-assign]


@dataclass
class _AheadRun:
    coord: ScriptedCoordinator
    loop: RunLoop
    metrics: WorkerMetrics

    def metric(self, name: str) -> float:
        value = self.metrics.registry.get_sample_value(name)
        assert value is not None
        return value


def _lease_ahead_run(tmp_path: Path, lease_ahead_at: int, **coord: Any
                     ) -> tuple[ScriptedCoordinator, RunLoop, _AheadRun]:
    """Two batches, each with an 8 s image and fast ones; leases take 2 s. The idle
    seconds (no candidate in flight) as the worker's metric reports them."""
    scripted = ScriptedCoordinator(batches=[], heartbeat_s=3, **coord)
    _slow_leases(scripted, 2)
    metrics = build_metrics()
    loop = _run(scripted, tmp_path, settings=_settings(lease_ahead_at=lease_ahead_at),
                paths=[["/slow.jpg", "/a.jpg", "/b.jpg"], ["/slow.jpg", "/a.jpg"]],
                metrics=metrics)
    return scripted, loop, _AheadRun(scripted, loop, metrics)


def test_the_next_batch_is_leased_during_the_tail_and_no_time_is_idle(tmp_path: Path) -> None:
    """Batch 1's fast images end at t=2, leaving its 8 s image: with --lease-ahead-at 1
    batch 2 is leased then (2 s) and downloads while batch 1's tail runs. The only times
    with nothing in flight are the first lease and the last one (the 204 that ends the
    run); both batches heartbeat and complete."""
    coord, loop, run = _lease_ahead_run(tmp_path, lease_ahead_at=1)
    idle = run.metric("pairfarm_worker_idle_seconds_total")
    assert sorted(coord.completed) == [1, 2] and loop.summary.batches_completed == 2
    assert coord.completed[1].outcomes == {"ok": 3} and coord.completed[2].outcomes == {"ok": 2}
    leases = [i for i, c in enumerate(coord.calls) if c == "/download/lease"]
    assert leases[1] < coord.calls.index("/download/1/complete")  # leased ahead
    # answered at t=2, 4 and (once batch 1 ended: 2 in hand at most) 12: the 204 to a
    # lease-ahead, asked again once batch 2 ended (t=12): the 204 at 14 ends the run
    assert [round(t) for t in coord.lease_times] == [2, 4, 12, 14]
    beats = {batch for _, batch in coord.heartbeats}
    assert beats == {1, 2} and any(t < 10 for t, b in coord.heartbeats if b == 2)
    # the first lease and the last 204 (t=12-14): no gap between batches
    assert idle == pytest.approx(4, abs=0.1)
    wire = run.metric("pairfarm_worker_downloaded_bytes_total")
    assert sum(r.bytes_downloaded for r in coord.completed.values()) == wire  # none twice
    assert loop.summary.idle_fraction == pytest.approx(4 / 14, abs=0.01)  # run ends at t=14


def test_without_lease_ahead_the_worker_idles_between_batches(tmp_path: Path) -> None:
    """The same run with --lease-ahead-at 0: batch 2 is leased once batch 1 completed,
    and the metric counts the three 2 s leases as idle."""
    coord, loop, run = _lease_ahead_run(tmp_path, lease_ahead_at=0)
    idle = run.metric("pairfarm_worker_idle_seconds_total")
    assert sorted(coord.completed) == [1, 2]
    assert loop.summary.idle_fraction == pytest.approx(6 / 22, abs=0.01)
    leases = [i for i, c in enumerate(coord.calls) if c == "/download/lease"]
    assert leases[1] > coord.calls.index("/download/1/complete")
    assert idle == pytest.approx(6, abs=0.1)


def test_a_lost_lease_ends_only_its_own_batch(tmp_path: Path) -> None:
    """Batch 2 (leased ahead) loses its lease on its first heartbeat; batch 1, in hand at
    the same time, still completes; the worker holds at most 2 batches."""
    coord, loop, _ = _lease_ahead_run(tmp_path, lease_ahead_at=1, lose_lease_of={2})
    assert list(coord.completed) == [1] and loop.summary.batches_lost == 1
    assert _public_files(tmp_path) == ["00000001.parquet", "00000001.tar",
                                       "00000001_stats.json"]
    # batch 1 was still in hand at the third lease (ahead, 204): asked again once it ended
    assert coord.lease_ahead == [False, True, True, False]


def test_the_shared_pipeline_renews_its_stage_and_counts_each_byte_once(
        tmp_path: Path) -> None:
    """Five batches on a pipeline that renews its stage after 2: batches 1-2 together,
    then 3, then 4-5 together; 3 stages, every candidate written, and the batches' bytes
    add up to the bytes received."""
    metrics = build_metrics()
    sizes: list[int] = []

    async def main() -> int:
        dns, dialer = hs.fake_network()
        routes = {"/a.jpg": hs.route_ok(JPEG), "/b.jpg": hs.route_ok(JPEG)}
        async with trio.open_nursery() as nursery:
            server = await hs.start_server(nursery, routes)
            urls = [server.url("/a.jpg"), server.url("/b.jpg")]

            async def one(pipeline: SharedPipeline, batch_id: int) -> None:
                candidates = [Candidate(id=10 * batch_id + i, url=u, caption="")
                              for i, u in enumerate(urls)]
                prepared = await pipeline.download(
                    batch_id, candidates, BatchRun(size=2), fs=fsspec.filesystem("file"),
                    directory=str(tmp_path))
                sizes.append(prepared.stats.bytes_downloaded)
                assert prepared.outcomes == {"ok": 2}
                await prepared.commit()

            async with SharedPipeline.open(_settings().pipeline,
                                           Network(resolver=dns, dialer=dialer), metrics,
                                           renew_after=2) as pipeline:
                for group in ([1, 2], [3], [4, 5]):
                    async with trio.open_nursery() as batches:
                        for batch_id in group:
                            batches.start_soon(one, pipeline, batch_id)
            nursery.cancel_scope.cancel()
        return pipeline.stages_opened

    opened = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.3))
    assert opened == 3
    assert len(sizes) == 5 and sum(sizes) == metrics.registry.get_sample_value(
        "pairfarm_worker_downloaded_bytes_total") > 0
    assert len(list(tmp_path.glob("*.parquet"))) == 5


def test_a_worker_stopping_on_one_batch_releases_the_other(tmp_path: Path) -> None:
    """Batch 2, leased during batch 1's slow image, fails on this machine (the output
    became a file) and --stop-after-failures 1 stops the worker: batch 1, still in hand,
    is released (no attempt spent), not left to expire."""
    out = tmp_path / "shards"

    def break_output(batch: int) -> None:
        if batch == 2:
            _turn_into_a_file(out)

    coord = ScriptedCoordinator(batches=[], on_lease=break_output)
    with pytest.raises(WorkerStopped, match="1 batches in a row failed on this machine"):
        _run(coord, out, settings=_settings(stop_after_failures=1, exit_when_idle=False),
             paths=[["/slow.jpg"], ["/a.jpg"]])
    assert coord.failed[2].cause is FailCause.WORKER and not coord.failed[2].release
    assert coord.failed[1].release and coord.completed == {}
