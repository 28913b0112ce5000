"""URL retries: a URL whose outcome was transient goes back to the coordinator and is
tried again in a later batch, up to ``--url-retries`` times, each retry due later
(``--url-retry-delay`` x ``--url-retry-growth`` ^ n). Each URL has one final outcome: the
stats count it once, by that outcome, and exactly one of its shard rows is ``final``.

On real PostgreSQL through ``coordinator.leases`` (time passes by moving ``not_before``
into the past), and end to end: ``pairfarm coordinator``, ``pairfarm worker`` and local
HTTP servers, one of which answers 503 until the test brings it up.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
import trio

from bench.simulator import check_invariants
from coordinator.archive import archive
from coordinator.batches import BatchFilter, requeue
from coordinator.errors import InvalidReport, LeaseConflict, SettingsError
from coordinator.leases import Leases
from coordinator.settings import make_archive_settings, make_lease_settings
from coordinator.stats import farm_stats
from pairfarm.client import CoordinatorClient
from pairfarm.outcomes import TRANSIENT, Outcome
from pairfarm.protocol import (
    BatchStatus,
    DownloadLease,
    DownloadReport,
    FailReport,
    FarmStats,
    PostprocessReport,
)
from pairfarm.shardformat import is_final
from tests import hostile_server as hs
from tests.conftest import REPO, cli_env, insert_candidates, run_cli, start_coordinator
from tests.leasing import engine_for, expire, leases, new_worker, report

DELAY = 100.0
GROWTH = 4.0


def _service(engine: sa.Engine, batch_size: int = 10, **kw: Any) -> Leases:
    return leases(engine, batch_size=batch_size, url_retries=2, url_retry_delay_s=DELAY,
                  url_retry_growth=GROWTH, **kw)


def _report(lease: DownloadLease, failed: dict[int, str],
            retry: dict[str, list[int]] | None = None) -> DownloadReport:
    """The report a worker sends: ``failed`` maps candidate ids to their outcome (the
    others are ok); ``retry`` by default as the worker decides it (``is_final``)."""
    outcomes: Counter[str] = Counter()
    decided: dict[str, list[int]] = defaultdict(list)
    for c in lease.candidates:
        outcome = Outcome(failed.get(c.id, "ok"))
        outcomes[outcome.value] += 1
        if not is_final(outcome, c.attempt, lease.url_retries):
            decided[outcome.value].append(c.id)
    base = report(lease.lease_token, len(lease.candidates))
    return base.model_copy(update={"outcomes": dict(outcomes),
                                   "retry": dict(decided) if retry is None else retry})


def _make_due(engine: sa.Engine) -> None:
    """What the passing of the retry delay does: every waiting retry is due."""
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE retry_chunks SET not_before = now() - interval '1 s'"))


def _waiting(engine: sa.Engine) -> dict[int, tuple[int, float]]:
    """Candidates waiting for a retry: their attempt, and seconds until it is due."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT u.id AS id, attempt, extract(epoch FROM not_before - now())::float8 AS s "
            "FROM retry_chunks, unnest(ids) AS u(id)"))
        return {int(r.id): (int(r.attempt), float(r.s)) for r in rows}


def _batch(engine: sa.Engine, batch_id: int) -> dict[str, Any]:
    with engine.connect() as conn:
        row = conn.execute(sa.text(
            "SELECT b.status, b.size, b.retried, b.outcomes, m.ids FROM batches b "
            "LEFT JOIN batch_members m ON m.batch_id = b.id WHERE b.id = :id"),
            {"id": batch_id}).one()
        return dict(row._mapping)


def _all_members(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text(
            "SELECT unnest(ids) FROM batch_members")).scalars())


def _attempts(lease: DownloadLease) -> dict[int, int]:
    return {c.id: c.attempt for c in lease.candidates}


def _lease(service: Leases, worker: int) -> DownloadLease:
    lease = service.lease_download(worker)
    assert lease is not None
    return lease


def test_a_transient_url_is_retried_later_until_its_last_attempt(db_url: str) -> None:
    insert_candidates(db_url, 10)
    with engine_for(db_url) as engine:
        service, worker = _service(engine), new_worker(engine, "w")
        first = _lease(service, worker)
        ids = sorted(_attempts(first))
        a, b, c, gone = ids[:4]
        assert set(_attempts(first).values()) == {1} and first.url_retries == 2
        sent = _report(first, {a: "http_5xx", b: "http_5xx", c: "timeout", gone: "http_4xx"})
        assert sent.retry == {"http_5xx": [a, b], "timeout": [c]}
        service.complete_download(first.batch_id, worker, sent)

        # the batch keeps the other 7; the 3 wait DELAY seconds for their attempt 2
        batch = _batch(engine, first.batch_id)
        assert (batch["size"], batch["retried"]) == (7, 3)
        assert batch["outcomes"] == {"ok": 6, "http_4xx": 1}
        assert sorted(batch["ids"]) == sorted(set(ids) - {a, b, c})
        waiting = _waiting(engine)
        assert {k: v[0] for k, v in waiting.items()} == {a: 2, b: 2, c: 2}
        assert all(DELAY - 5 < s <= DELAY for _, s in waiting.values())
        stats = farm_stats(engine, 900.0)
        assert stats.outcomes == {"ok": 6, "http_4xx": 1}
        assert (stats.retried, stats.candidates_retry_waiting) == (3, 3)
        assert (stats.candidates_pending, stats.candidates_unbatched) == (3, 3)
        assert service.lease_download(worker) is None  # not due yet
        held = check_invariants(engine)  # the waiting ones are neither lost nor doubled
        assert held.consistent and held.lost == 0

        _make_due(engine)
        second = _lease(service, worker)
        assert _attempts(second) == {a: 2, b: 2, c: 2}
        service.complete_download(second.batch_id, worker,
                                  _report(second, {b: "http_5xx", c: "connect"}))
        waiting = _waiting(engine)
        assert {k: v[0] for k, v in waiting.items()} == {b: 3, c: 3}
        # the second retry waits GROWTH times longer
        assert all(DELAY * GROWTH - 5 < s <= DELAY * GROWTH for _, s in waiting.values())

        _make_due(engine)
        third = _lease(service, worker)
        assert _attempts(third) == {b: 3, c: 3}
        # attempt 3 is the last (2 retries): asking for a 4th is refused, nothing changes
        with pytest.raises(InvalidReport, match="last attempt"):
            service.complete_download(third.batch_id, worker, _report(
                third, {b: "http_5xx", c: "connect"},
                retry={"http_5xx": [b], "connect": [c]}))
        assert _batch(engine, third.batch_id)["status"] == "leased"
        assert _waiting(engine) == {}
        final = _report(third, {b: "http_5xx", c: "connect"})
        assert final.retry == {}  # the worker marks them final itself
        service.complete_download(third.batch_id, worker, final)

        stats = farm_stats(engine, 900.0)
        assert stats.outcomes == {"ok": 7, "http_4xx": 1, "http_5xx": 1, "connect": 1}
        assert sum(stats.outcomes.values()) == stats.candidates_total == 10
        assert (stats.retried, stats.candidates_retry_waiting) == (5, 0)
        assert stats.candidates_pending == 0 and stats.progress_pct == 100.0
        assert sorted(_all_members(engine)) == ids  # each candidate in exactly one batch
        assert service.lease_download(worker) is None


def test_a_non_transient_or_foreign_retry_refuses_the_report_whole(db_url: str) -> None:
    insert_candidates(db_url, 20)
    with engine_for(db_url) as engine:
        service, worker = _service(engine), new_worker(engine, "w")
        lease = _lease(service, worker)
        other = _lease(service, worker)
        mine, theirs = sorted(_attempts(lease)), sorted(_attempts(other))
        failed = {mine[0]: "http_4xx", mine[1]: "http_5xx", mine[2]: "dns", mine[3]: "http_5xx"}
        bad = {
            "not transient": {"http_4xx": [mine[0]]},
            "not transient: ['dns']": {"dns": [mine[2]]},
            "not in this batch": {"http_5xx": [theirs[0], mine[1]]},
            "more candidates than": {"http_5xx": [mine[1], mine[3], mine[4]]},
            "more than once": {"http_5xx": [mine[1], mine[1]]},
        }
        for why, retry in bad.items():
            with pytest.raises(InvalidReport, match=re.escape(why)):
                service.complete_download(lease.batch_id, worker,
                                          _report(lease, failed, retry=retry))
            assert _waiting(engine) == {}, why
            assert len(_batch(engine, lease.batch_id)["ids"]) == 10, why
            assert _batch(engine, lease.batch_id)["status"] == "leased", why
        sent = _report(lease, failed)
        assert sent.retry == {"http_5xx": [mine[1], mine[3]]}  # 404 and dns: never
        service.complete_download(lease.batch_id, worker, sent)
        assert set(_waiting(engine)) == {mine[1], mine[3]}
        assert farm_stats(engine, 900.0).outcomes == {"ok": 6, "http_4xx": 1, "dns": 1}


def test_a_worker_whose_lease_is_lost_sends_nothing_back(db_url: str) -> None:
    insert_candidates(db_url, 20)
    with engine_for(db_url) as engine:
        service, worker, other = _service(engine), new_worker(engine, "w"), new_worker(
            engine, "x")
        expired = _lease(service, worker)
        requeued = _lease(service, worker)
        expire(engine, expired.batch_id)
        assert service.reap() == [(expired.batch_id, "pending")]
        requeue(engine, BatchFilter(states=(BatchStatus.LEASED,), ids=(requeued.batch_id,)))
        for lost in (expired, requeued):
            failed = dict.fromkeys(_attempts(lost), "timeout")
            with pytest.raises(LeaseConflict):
                service.complete_download(lost.batch_id, worker, _report(lost, failed))
        assert _waiting(engine) == {} and len(_all_members(engine)) == 20
        again = _lease(service, other)  # the same batch, whole, for another worker
        assert again.batch_id == expired.batch_id
        assert _attempts(again) == dict.fromkeys(_attempts(expired), 1)


def _fail_first_batch(service: Leases, worker: int, outcome: str) -> None:
    """Lease a batch and complete it with every candidate at ``outcome`` (sent back)."""
    first = _lease(service, worker)
    service.complete_download(first.batch_id, worker,
                              _report(first, dict.fromkeys(_attempts(first), outcome)))


def test_retries_take_a_bounded_share_of_a_batch_while_new_candidates_remain(
        db_url: str) -> None:
    insert_candidates(db_url, 40)
    with engine_for(db_url) as engine:
        service, worker = _service(engine), new_worker(engine, "w")
        _fail_first_batch(service, worker, "http_429")
        _make_due(engine)
        retried_per_batch = []
        while (lease := service.lease_download(worker)) is not None:
            retried_per_batch.append(sum(a == 2 for a in _attempts(lease).values()))
            service.complete_download(lease.batch_id, worker, _report(lease, {}))
        # 30 new candidates: three batches of 8 new + 2 retries, then the last 4 retries
        assert retried_per_batch == [2, 2, 2, 4]
        stats = farm_stats(engine, 900.0)
        assert stats.outcomes == {"ok": 40} and stats.retried == 10
        assert sorted(_all_members(engine)) == sorted(set(_all_members(engine)))


def test_archive_keeps_waiting_candidates_and_requeue_keeps_their_attempt(
        db_url: str, tmp_path: Path) -> None:
    insert_candidates(db_url, 10)
    folder = tmp_path / "archive"
    settings = make_archive_settings(location=str(folder), min_age_s=0)
    with engine_for(db_url) as engine:
        service = _service(engine, max_attempts=1)
        worker, gpu = new_worker(engine, "w"), new_worker(engine, "g", "gpu")
        first = _lease(service, worker)
        ids = sorted(_attempts(first))
        service.complete_download(first.batch_id, worker,
                                  _report(first, dict.fromkeys(ids[:3], "http_5xx")))
        _postprocess(service, gpu)
        before = farm_stats(engine, 900.0)
        assert archive(db_url, settings).files  # the first batch, done, goes
        after = farm_stats(engine, 900.0)
        assert (after.outcomes, after.retried, after.candidates_pending) == (
            before.outcomes, before.retried, before.candidates_pending) == ({"ok": 7}, 3, 3)
        assert _hot_candidates(engine) == ids[:3]  # the waiting ones stay

        _make_due(engine)
        second = _lease(service, worker)
        assert _attempts(second) == dict.fromkeys(ids[:3], 2)
        service.fail("download", second.batch_id, worker,
                     FailReport(lease_token=second.lease_token, reason="disk full"))
        assert _batch(engine, second.batch_id)["status"] == "failed"
        requeue(engine, BatchFilter(ids=(second.batch_id,)))
        again = _lease(service, worker)
        assert again.batch_id == second.batch_id
        assert _attempts(again) == dict.fromkeys(ids[:3], 2)  # still their 2nd attempt
        service.complete_download(again.batch_id, worker, _report(again, {}))
        _postprocess(service, gpu)
        assert archive(db_url, settings).files
        rows = [r for p in sorted(folder.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
        assert sorted(r["candidate_id"] for r in rows) == ids  # each candidate once
        assert _hot_candidates(engine) == []
        with engine.connect() as conn:
            left = conn.execute(sa.text(
                "SELECT (SELECT count(*) FROM retry_chunks), (SELECT count(*) FROM batch_members)"
            )).one()
        assert tuple(left) == (0, 0)
        stats = farm_stats(engine, 900.0)
        assert (stats.outcomes, stats.retried, stats.candidates_pending) == ({"ok": 10}, 3, 0)


def _postprocess(service: Leases, gpu: int) -> None:
    pp = service.lease_postprocess(gpu)
    assert pp is not None
    service.complete_postprocess(pp.batch_id, gpu, PostprocessReport(
        lease_token=pp.lease_token, kept=pp.count, dropped=0, duration_s=1.0))


def _hot_candidates(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT id FROM candidates ORDER BY id")).scalars())


def test_transient_classes() -> None:
    assert {o.value for o in TRANSIENT} == {
        "timeout", "connect", "http_5xx", "http_429", "host_busy"}
    assert is_final(Outcome.HTTP_5XX, 3, 2) and not is_final(Outcome.HTTP_5XX, 2, 2)
    assert is_final(Outcome.HTTP_4XX, 1, 2) and is_final(Outcome.TIMEOUT, 1, 0)


@pytest.mark.parametrize("settings", [
    {"url_retries": -1}, {"url_retries": 21}, {"url_retry_delay_s": -1.0},
    {"url_retry_delay_s": float("nan")}, {"url_retry_growth": 0.5},
    {"url_retries": 20, "url_retry_growth": 4.0},  # the last wait: 3600 s x 4^19
])
def test_retry_settings_are_checked(settings: dict[str, Any]) -> None:
    with pytest.raises(SettingsError):
        make_lease_settings(**settings)


def _up_coordinator_argv(tmp_path: Path, *args: str) -> list[str]:
    from localfarm.cli import up, up_settings
    from localfarm.up import _Database, coordinator_child

    with up.make_context("up", ["--out", str(tmp_path), *args]) as ctx:
        settings = up_settings(**ctx.params)
    return coordinator_child(settings, _Database(url="postgresql://h/db"), 8600, 100).argv


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_pairfarm_up_retries_no_url_unless_asked(tmp_path: Path) -> None:
    plain = _up_coordinator_argv(tmp_path)
    assert _flag(plain, "--url-retries") == "0"  # a run ends once every URL was tried
    asked = _up_coordinator_argv(tmp_path, "--url-retries", "2", "--url-retry-delay", "5")
    assert (_flag(asked, "--url-retries"), _flag(asked, "--url-retry-delay")) == ("2", "5.0")


# -- end to end --------------------------------------------------------------------------

JPEG = hs.jpeg_bytes(200, 150, seed=3)
FLAKY = "127.0.0.2"  # 503 (Retry-After: 0) until the test brings it up
DEAD = "127.0.0.3"  # always 500
OTHER = "127.0.0.4"  # 200, and 404 for /gone/
COUNTS = {"flaky": 8, "dead": 3, "gone": 3, "fine": 6}


class _Switch:
    up = False


def _flaky(switch: type[_Switch]) -> hs.Handler:
    async def handler(stream: trio.SocketStream, request: hs.Request) -> None:
        if switch.up:
            await hs.respond(stream, 200, JPEG, {"Content-Type": "image/jpeg"})
        else:
            await hs.respond(stream, 503, b"down", {"Retry-After": "0"})
    return handler


async def _dead(stream: trio.SocketStream, request: hs.Request) -> None:
    await hs.respond(stream, 500, b"broken")


async def _other(stream: trio.SocketStream, request: hs.Request) -> None:
    if request.path.startswith("/gone/"):
        await hs.respond(stream, 404, b"gone")
    else:
        await hs.respond(stream, 200, JPEG, {"Content-Type": "image/jpeg"})


def _start_worker(url: str, token: str, out: Path, log: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "pairfarm", "-v", "worker", "--coordinator", url,
            "--token", token, "-o", str(out), "--allow-cidr", "127.0.0.0/8", "--retries", "0",
            "--idle-poll", "1", "--no-progress", "--image-size", "64", "--decode-threads", "1"]
    with log.open("wb") as sink:
        return subprocess.Popen(args, cwd=REPO, env=cli_env(), stdout=sink,
                                stderr=subprocess.STDOUT)


def _wait_for(check: Any, what: str, logs: tuple[Path, ...], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs)
    raise AssertionError(f"timed out waiting for {what}\n{tails}")


def _drained(stats: FarmStats) -> bool:
    busy = {s for s, n in stats.batches.items() if n}
    return stats.candidates_pending == 0 and busy == {"downloaded"}


@pytest.mark.slow
def test_a_host_down_for_the_first_batch_gets_its_urls_retried_later(
        db_url: str, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    logs = (tmp_path / "coordinator.log", tmp_path / "worker.log")
    with ExitStack() as stack:
        hosts = {FLAKY: _flaky(_Switch), DEAD: _dead, OTHER: _other}
        ports = {h: stack.enter_context(hs.server_thread({}, h, fn)).port
                 for h, fn in hosts.items()}
        urls = ([f"http://{FLAKY}:{ports[FLAKY]}/flaky/{n}.jpg" for n in range(COUNTS["flaky"])]
                + [f"http://{DEAD}:{ports[DEAD]}/dead/{n}.jpg" for n in range(COUNTS["dead"])]
                + [f"http://{OTHER}:{ports[OTHER]}/gone/{n}.jpg" for n in range(COUNTS["gone"])]
                + [f"http://{OTHER}:{ports[OTHER]}/fine/{n}.jpg" for n in range(COUNTS["fine"])])
        listing = tmp_path / "candidates.parquet"
        captions = [f"picture {n}" for n in range(len(urls))]
        pq.write_table(pa.table({"url": urls, "caption": captions}), listing)
        run_cli("ingest", str(listing), env=cli_env(DATABASE_URL=db_url))
        coord = start_coordinator(db_url, logs[0], "--batch-size", "100", "--url-retries", "2",
                                  "--url-retry-delay", "2", "--url-retry-growth", "1.5")
        stack.callback(coord.stop)
        admin = CoordinatorClient(coord.url, coord.token("admin"))
        stack.callback(admin.close)
        worker = _start_worker(coord.url, coord.token("worker", "w"), out, logs[1])
        stack.callback(lambda: worker.poll() is None and worker.kill())
        # the first batch: every flaky and dead URL sent back; then the host comes up
        _wait_for(lambda: admin.stats().retried >= 11, "the first batch", logs)
        _Switch.up = True
        _wait_for(lambda: _drained(admin.stats()) and admin.stats().retried == 14,
                  "every retry", logs)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0
        stats = admin.stats()

    # counted once each, by the final outcome; 8 + 3 first retries, 3 second ones
    assert stats.outcomes == {"ok": 14, "http_5xx": 3, "http_4xx": 3}
    assert sum(stats.outcomes.values()) == stats.candidates_total == len(urls)
    assert (stats.retried, stats.candidates_retry_waiting) == (14, 0)
    rows = [r for p in sorted(out.glob("*.parquet")) if not p.name.startswith(".")
            for r in pq.read_table(p).to_pylist()]
    by_url: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_url[r["url"]].append(r)
    assert set(by_url) == set(urls)
    for url, tries in by_url.items():
        tries.sort(key=lambda r: r["attempt"])
        finals = [r for r in tries if r["final"]]
        assert len(finals) == 1 and finals[0] is tries[-1], url  # one final row, the last
        kind = url.split("/")[3]
        expected = {"flaky": [("http_5xx", 1), ("ok", 2)],
                    "dead": [("http_5xx", 1), ("http_5xx", 2), ("http_5xx", 3)],
                    "gone": [("http_4xx", 1)], "fine": [("ok", 1)]}[kind]
        assert [(r["error_class"] or "ok", r["attempt"]) for r in tries] == expected, url
    with psycopg.connect(db_url.replace("+psycopg", "")) as conn:
        sizes = conn.execute("SELECT sum(size), sum(retried) FROM batches").fetchone()
    assert sizes == (len(urls), 14)


def _chunks(engine: sa.Engine) -> list[tuple[int, int, float]]:
    """The retry chunks: (ids, attempt, seconds until due) in id order."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT cardinality(ids) AS n, attempt, "
            "extract(epoch FROM not_before - now())::float8 AS s FROM retry_chunks ORDER BY id"))
        return [(int(r.n), int(r.attempt), float(r.s)) for r in rows]


def test_a_completion_writes_retry_chunks_and_a_lease_splits_the_one_it_crosses(
        db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sent-back candidates wait as chunks of up to RETRY_CHUNK_IDS (one group per
    attempt); a lease takes whole chunks while they fit and the first ids of the one it
    crosses, whose rest stays with its attempt and due time."""
    monkeypatch.setattr("coordinator.leases.RETRY_CHUNK_IDS", 4)
    insert_candidates(db_url, 40)
    with engine_for(db_url) as engine:
        service, worker = _service(engine), new_worker(engine, "w")
        _fail_first_batch(service, worker, "timeout")
        chunks = _chunks(engine)
        assert [(n, a) for n, a, _ in chunks] == [(4, 2), (4, 2), (2, 2)]
        assert all(DELAY - 5 < s <= DELAY for _, _, s in chunks)
        with engine.begin() as conn:  # one chunk is due, the others wait 1 and 2 h more
            conn.execute(sa.text(
                "UPDATE retry_chunks SET not_before = now() + (rank - 1) * interval '1 h' "
                "FROM (SELECT id AS cid, rank() OVER (ORDER BY id) FROM retry_chunks) r "
                "WHERE r.cid = retry_chunks.id"))
        waits = [s for _, _, s in _chunks(engine)]
        second = _lease(service, worker)  # 2 retries (RETRY_SHARE of 10) + 8 new
        assert sorted(_attempts(second).values()) == [1] * 8 + [2, 2]
        assert [(n, a) for n, a, _ in _chunks(engine)] == [(4, 2), (2, 2), (2, 2)]
        # the rest of the crossed chunk went back still due, the others untouched
        left = [s for _, _, s in _chunks(engine)]
        assert left[0] == pytest.approx(waits[1], abs=5)
        assert left[1] == pytest.approx(waits[2], abs=5)
        assert left[2] == pytest.approx(waits[0], abs=5) and left[2] <= 0
        with engine.connect() as conn:
            members = conn.execute(sa.text(
                "SELECT ids, attempts FROM batch_members WHERE batch_id = :b"),
                {"b": second.batch_id}).one()
        assert dict(zip(members.ids, members.attempts, strict=True)) == _attempts(second)
        # a second retry of one of them goes back at attempt 3, in its own chunk
        retried = [i for i, a in _attempts(second).items() if a == 2]
        service.complete_download(second.batch_id, worker,
                                  _report(second, dict.fromkeys(retried[:1], "http_5xx")))
        assert [(n, a) for n, a, _ in _chunks(engine)][-1] == (1, 3)
        with engine.connect() as conn:
            members = conn.execute(sa.text(
                "SELECT ids, attempts FROM batch_members WHERE batch_id = :b"),
                {"b": second.batch_id}).one()
        kept = {i: a for i, a in _attempts(second).items() if i != retried[0]}
        assert dict(zip(members.ids, members.attempts, strict=True)) == kept


def test_concurrent_leases_take_each_due_retry_exactly_once(db_url: str) -> None:
    """Eight threads drain a queue of only due retry chunks of mixed sizes (and some
    pending candidates): every candidate is leased once, at its chunk's attempt."""
    insert_candidates(db_url, 3_000)
    with engine_for(db_url) as engine:
        with engine.begin() as conn:  # ids 1-1,999 wait in 150 chunks of ~13 ids
            conn.execute(sa.text("DELETE FROM pending_chunks WHERE ids[1] < 2000"))
            conn.execute(sa.text(
                "INSERT INTO retry_chunks (not_before, attempt, ids) "
                "SELECT now() - interval '1 s', 2 + g % 2, array_agg(id ORDER BY id) "
                "FROM (SELECT id, (id * 7919) % 150 AS g FROM candidates WHERE id < 2000) s "
                "GROUP BY g"))
        service = leases(engine, batch_size=70, url_retries=2, url_retry_delay_s=DELAY)
        workers = [new_worker(engine, f"w{i}") for i in range(8)]

        def drain(worker: int) -> list[tuple[int, int]]:
            got = []
            while (lease := service.lease_download(worker)) is not None:
                got.extend((c.id, c.attempt) for c in lease.candidates)
            return got

        with ThreadPoolExecutor(8) as pool:
            leased = [x for part in pool.map(drain, workers) for x in part]
        ids = [i for i, _ in leased]
        assert len(ids) == len(set(ids)) == 3_000
        with engine.connect() as conn:
            expected = dict(conn.execute(sa.text(
                "SELECT id, CASE WHEN id >= 2000 THEN 1 ELSE 2 + (id * 7919) % 150 % 2 END "
                "FROM candidates")).all())
            left = conn.execute(sa.text("SELECT count(*) FROM retry_chunks")).scalar_one()
        assert dict(leased) == expected and left == 0
