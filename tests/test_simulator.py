"""bench/simulator.py on a small run against a real coordinator and PostgreSQL, and its
invariant checker on databases where an invariant is broken on purpose."""

from __future__ import annotations

from pathlib import Path

import orjson
import sqlalchemy as sa

from bench.simulator import (
    SimConfig,
    after_first_round,
    check_invariants,
    describe,
    describe_timeline,
    lease_head,
    lease_retryable,
    over_bound_s,
    run,
    steady_window,
)
from tests.conftest import insert_candidates
from tests.leasing import leases, new_worker

FINISHED = "status = 'done', worker_id = NULL, lease_token = NULL, lease_expires_at = NULL"


def test_a_small_farm_with_failures_and_kills_drains_consistently(
        db_url: str, pg_server: object, engine: sa.Engine, tmp_path: Path) -> None:
    config = SimConfig(workers=50, candidates=3_000, batch_size=50, download_mean_s=1.0,
                       lease_ttl_s=3.0, reap_interval_s=0.3, fail_fraction=0.1,
                       kill_fraction=0.1, max_attempts=10, idle_max_s=4.0, max_run_s=240,
                       cpu_sample_s=0.2, retry_fraction=0.1, url_retry_delay_s=0.5)
    report = run(config, db_url, pg_server.pid, tmp_path)  # type: ignore[attr-defined]
    text = "\n".join(describe(report))
    inv = report.invariants
    assert report.ok, text
    assert inv.candidates == 3_000 and inv.lost == 0 and inv.in_two_batches == 0
    batches = inv.batches.get("downloaded", 0)
    assert set(inv.batches) == {"downloaded"} and batches >= 60, text  # 60 of 50, or more
    events = report.calls.events
    assert events["killed"] > 0 and events["failed"] > 0, text
    # the completions sent candidates back; they were leased again and the queue drained
    with engine.connect() as conn:
        again = conn.execute(sa.text(
            "SELECT count(*) FROM batch_members, unnest(attempts) AS a(n) WHERE n > 1")
        ).scalar_one()
    assert events["sent back"] > 0 and again > 0, text
    assert inv.retry_waiting == 0, text
    assert events["completed"] == batches, text
    with engine.connect() as conn:
        attempts = conn.execute(sa.text("SELECT sum(attempts) FROM batches")).scalar_one()
    # every kill (its lease expired and was reaped) and every failure cost an attempt, as
    # does a lease that expired under a worker too slow to heartbeat in time
    lapsed = events["lease_lost"] + events["complete_refused"]
    assert attempts == batches + events["killed"] + events["failed"] + lapsed, text
    assert events["leased"] == attempts
    assert report.cpu_s["coordinator"] > 0 and report.cpu_s["postgres"] > 0
    assert all(kind == "409" for _, kind in report.calls.errors), text
    # every 204 the workers got was answered by a lease that looked or by the hold
    assert sum(report.empty_answers.values()) == events["idle"] > 0, text
    # each answered call carries the coordinator's own time, within the client's
    calls = report.calls
    for op in ("lease", "complete", "lease 204"):
        assert len(calls.server[op]) == len(calls.seconds[op]) > 0, op
        assert sum(calls.server[op]) <= sum(calls.seconds[op]), op
    assert calls.loop_lag and "in the app p50=" in text and "loop lag" in text
    later = after_first_round(report)  # asked after 1 s of downloads
    assert 0 < len(later) < len(calls.seconds["lease"]) and "after the ramp" in text
    # the CPU was sampled through the run; the steady window is bounded by two samples
    # and counts its leases and the CPU spent between them, PostgreSQL's by kind
    assert len(calls.cpu) >= 2 and calls.cpu[-1].postgres["backend"] > 0
    window = steady_window(report)
    assert window is not None and 0 < window.leases < events["leased"], text
    assert window.cpu_s["coordinator"] > 0 and window.cpu_s["postgres backend"] > 0
    assert "steady window" in text and "backend" in text
    # the timeline puts every lease in one window of when it was asked
    lines = describe_timeline(report, step_s=1.0)[1:]
    counts = [int(line.split("n=")[1].split()[0]) for line in lines]
    assert sum(counts) == len(calls.seconds["lease"]) and len(lines) > 1, text
    assert "leases by 30 s window" in text


def test_a_small_farm_fed_in_waves_keeps_its_hot_set_at_the_archive_bound(
        db_url: str, pg_server: object, tmp_path: Path) -> None:
    """Candidates come in 4 waves, each once fewer than half a wave is unfinished, and
    the coordinator archives downloaded batches while the workers go on: every candidate
    ends hot or archived once, and a wave's lift of the hot set over the bound lasts
    until the archive's next look."""
    config = SimConfig(workers=10, candidates=4_000, batch_size=50, download_mean_s=1.0,
                       lease_ttl_s=5.0, reap_interval_s=0.3, fail_fraction=0.0,
                       kill_fraction=0.0, max_run_s=90, cpu_sample_s=0.2,
                       retry_fraction=0.0, hot_max_candidates=2_000, archive_interval_s=0.2,
                       waves=4, monitor_poll_s=0.05, idle_s=0.2, idle_max_s=0.5)
    report = run(config, db_url, pg_server.pid, tmp_path)  # type: ignore[attr-defined]
    text = "\n".join(describe(report))
    inv = report.invariants
    assert report.ok, text
    assert report.calls.events["waves ingested"] == 3, text
    assert 0 < inv.archived == inv.archived_rows == inv.archived_ids, text
    assert inv.candidates + inv.archived == 4_000, text
    # a wave lifts the hot set over the bound (at most by its own 1,000) until the
    # archive's next look (every 0.2 s) brings it back under
    samples = report.calls.hot
    assert 2_000 < max(hot for _, hot, _ in samples) <= 3_000, text
    assert over_bound_s(samples, 2_000) < 2.0, text
    assert "hot set (bound 2,000" in text


def test_the_checker_finds_each_broken_invariant(db_url: str, engine: sa.Engine) -> None:
    insert_candidates(db_url, 64)
    service = leases(engine, batch_size=16)
    worker = new_worker(engine, "vm-1")
    first, second = service.lease_download(worker), service.lease_download(worker)
    assert first is not None and second is not None
    clean = check_invariants(engine)
    assert clean.consistent and not clean.drained
    assert (clean.candidates, clean.pending_candidates, clean.leased_batches) == (64, 32, 2)

    with engine.begin() as conn:  # a third live batch holding the first one's candidates
        third = conn.execute(sa.text(
            "INSERT INTO batches (status, size, lease_token, lease_expires_at) "
            "VALUES ('leased', 16, 'x', now() + interval '1 h') RETURNING id")).scalar_one()
        conn.execute(sa.text("INSERT INTO batch_members (batch_id, ids) SELECT :b, ids "
                             "FROM batch_members WHERE batch_id = :a"),
                     {"a": first.batch_id, "b": third})
    doubled = check_invariants(engine)
    assert (doubled.in_two_batches, doubled.in_two_live_batches) == (16, 16)
    assert not doubled.consistent

    with engine.begin() as conn:  # the double no longer live: still in two batches
        conn.execute(sa.text(f"UPDATE batches SET {FINISHED} WHERE id = :b"), {"b": third})
    finished = check_invariants(engine)
    assert (finished.in_two_batches, finished.in_two_live_batches) == (16, 0)
    assert not finished.consistent
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM batch_members WHERE batch_id = :b"), {"b": third})
        conn.execute(sa.text("DELETE FROM batches WHERE id = :b"), {"b": third})
        # a pending chunk holding the second batch's candidates again
        conn.execute(sa.text("INSERT INTO pending_chunks (ids) SELECT ids FROM batch_members "
                             "WHERE batch_id = :a"), {"a": second.batch_id})
    again = check_invariants(engine)
    assert again.pending_and_batched == 16 and not again.consistent

    with engine.begin() as conn:  # undo that, then lose the candidates of one chunk
        conn.execute(sa.text("DELETE FROM pending_chunks WHERE id = (SELECT max(id) "
                             "FROM pending_chunks)"))
        lost_ids = conn.execute(sa.text(
            "DELETE FROM pending_chunks WHERE id = (SELECT min(id) FROM pending_chunks) "
            "RETURNING cardinality(ids)")).scalar_one()
    lost = check_invariants(engine)
    assert lost.lost == lost_ids > 0 and lost.pending_and_batched == 0
    assert not lost.consistent

    with engine.begin() as conn:  # nothing pending, nothing leased: drained
        conn.execute(sa.text("DELETE FROM pending_chunks"))
        conn.execute(sa.text(f"UPDATE batches SET {FINISHED}"))
    drained = check_invariants(engine)
    assert drained.drained and drained.lost == 32

    with engine.begin() as conn:  # one of them waits for a URL retry: held, not drained
        conn.execute(sa.text(
            "INSERT INTO retry_chunks (ids, attempt, not_before) SELECT ARRAY[min(c.id)], 2, now() "
            "FROM candidates c WHERE NOT EXISTS (SELECT 1 FROM batch_members bm "
            "WHERE c.id = ANY (bm.ids))"))
    waiting = check_invariants(engine)
    assert (waiting.retry_waiting, waiting.lost) == (1, 31)
    assert not waiting.drained

    with engine.begin() as conn:  # a waiting retry that is also in a batch
        conn.execute(sa.text(
            "INSERT INTO retry_chunks (ids, attempt, not_before) SELECT ARRAY[ids[1]], 2, now() "
            "FROM batch_members WHERE batch_id = :a"), {"a": second.batch_id})
    assert check_invariants(engine).pending_and_batched == 1


def test_lease_head_reads_a_real_lease_body(engine: sa.Engine, db_url: str) -> None:
    insert_candidates(db_url, 37)
    lease = leases(engine, batch_size=37).lease_download_raw(new_worker(engine, "w"))
    assert lease is not None
    body = lease.to_json().encode()
    assert lease_head(body) == (lease.info.batch_id, lease.info.lease_token, 37)
    # another layout (fields in another order) is parsed whole
    other = orjson.dumps({"candidates": {"id": [4, 5]}, "batch_id": 3, "lease_token": "t"})
    assert lease_head(other) == (3, "t", 2)


def test_lease_retryable_keeps_the_candidates_below_their_last_attempt(
        engine: sa.Engine, db_url: str) -> None:
    insert_candidates(db_url, 37)
    lease = leases(engine, batch_size=37).lease_download_raw(new_worker(engine, "w"))
    assert lease is not None and lease.url_retries == 2
    body = lease.to_json().encode()
    assert lease_retryable(body) == orjson.loads(body)["candidates"]["id"]  # all attempt 1
    other = orjson.dumps({"url_retries": 2, "batch_id": 3, "lease_token": "t",
                          "candidates": {"id": [4, 5, 6], "attempt": [1, 3, 2]}})
    assert lease_retryable(other) == [4, 6]
    spliced = (b'{"batch_id":3,"lease_token":"t","url_retries":1,"candidates":{"id":[4,5,6],'
               b'"url":["a","b]","c"],"attempt":[2,1,1]}}')
    assert lease_retryable(spliced) == [5, 6]
