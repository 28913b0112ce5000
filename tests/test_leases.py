"""Batch leasing on a real Postgres: drains, concurrency, expiry, fencing, reports."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from coordinator.errors import InvalidReport, LeaseConflict, NotFound
from coordinator.leases import Leases
from coordinator.metrics import make_metrics
from coordinator.queries import Q
from coordinator.settings import make_lease_settings
from pairfarm.protocol import BatchStatus, DownloadLease, FailCause, FailReport
from tests.conftest import insert_candidates
from tests.leasing import (
    engine_for,
    expire,
    leases,
    mark_batched,
    new_worker,
    pending_ids,
    report,
)


def _all_ids(engine: sa.Engine) -> set[int]:
    with engine.connect() as conn:
        return set(conn.execute(sa.text("SELECT id FROM candidates")).scalars())


def _drain(service: Leases, worker_id: int) -> list[list[int]]:
    batches = []
    while (lease := service.lease_download(worker_id)) is not None:
        batches.append([c.id for c in lease.candidates])
    return batches


def _drain_concurrently(engine: sa.Engine, service: Leases, clients: int) -> list[list[int]]:
    workers = [new_worker(engine, f"w{i}") for i in range(clients)]
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda w: _drain(service, w), workers))
    return [batch for per_client in results for batch in per_client]


def _assert_exactly_once(batches: list[list[int]], expected: set[int]) -> None:
    leased = [i for batch in batches for i in batch]
    assert len(leased) == len(set(leased)), "a candidate was leased twice"
    assert set(leased) == expected, "a candidate was never leased"


def test_sequential_drain_keeps_batches_full(db_url: str) -> None:
    insert_candidates(db_url, 5_050)
    with engine_for(db_url) as engine:
        service = leases(engine, batch_size=500)
        batches = _drain(service, new_worker(engine, "solo"))
        _assert_exactly_once(batches, _all_ids(engine))
        assert [len(b) for b in batches] == [500] * 10 + [50]
        with engine.connect() as conn:
            members = {r.batch_id: sorted(r.ids) for r in conn.execute(
                sa.text("SELECT batch_id, ids FROM batch_members"))}
        assert sorted(sorted(b) for b in batches) == sorted(members.values()), (
            "each lease's candidates are its batch's members")


@pytest.mark.parametrize("layout", ["all_pending", "one_percent", "clustered_at_end"])
def test_sixteen_concurrent_leasers_lease_every_url_exactly_once(db_url: str,
                                                                 layout: str) -> None:
    insert_candidates(db_url, 60_000)
    with engine_for(db_url) as engine:
        if layout == "one_percent":
            mark_batched(engine, "id % 100 <> 0")
        elif layout == "clustered_at_end":
            mark_batched(engine, "id <= 59_400")
        pending = set(pending_ids(engine))
        service = leases(engine, batch_size=40 if layout != "all_pending" else 500)
        batches = _drain_concurrently(engine, service, 16)
        _assert_exactly_once(batches, pending)
        assert service.lease_download(new_worker(engine, "late")) is None


def test_sample_adapts_as_the_table_drains(db_url: str) -> None:
    insert_candidates(db_url, 100_000)
    with engine_for(db_url) as engine:
        mark_batched(engine, "id % 100 <> 0")  # 99 % done: 1,000 pending
        service = leases(engine, batch_size=100, max_sample_rows=10**9)
        worker = new_worker(engine, "w")
        sizes, from_sample, lowest = [], 0, 1.0
        while (lease := service.lease_download(worker)) is not None:
            sizes.append(len(lease.candidates))
            assert service.last_form is not None
            from_sample += service.last_form.from_sample
            lowest = min(lowest, service.rate.fraction)
        assert sizes == [100] * 10, "batches stay full until the table is drained"
        # 1 % of the rows are pending; runs learned 0.071-0.1, random per sample
        assert lowest <= 0.25, "the sampler learned the pending fraction (it starts at 1)"
        assert from_sample >= 500, "most rows still come from TABLESAMPLE, not the index"


def test_expired_lease_is_released_to_another_worker_and_fences_the_old_one(
        db_url: str) -> None:
    insert_candidates(db_url, 300)
    with engine_for(db_url) as engine:
        service = leases(engine, batch_size=100)
        alice, bob = new_worker(engine, "alice"), new_worker(engine, "bob")
        first = service.lease_download(alice)
        assert first is not None
        expire(engine, first.batch_id)
        assert service.reap() == [(first.batch_id, "pending")]
        second = service.lease_download(bob)
        assert second is not None
        assert second.batch_id == first.batch_id and second.attempt == 2
        assert second.candidates == first.candidates, "same batch, same candidates, same keys"
        with pytest.raises(LeaseConflict):
            service.complete_download(first.batch_id, alice, report(first.lease_token, 100))
        with pytest.raises(LeaseConflict):
            service.heartbeat("download", first.batch_id, alice, first.lease_token)
        state = service.complete_download(second.batch_id, bob, report(second.lease_token, 100))
        assert state.status == BatchStatus.DOWNLOADED


def test_attempts_exhausted_fail_the_batch_with_its_reason(db_url: str) -> None:
    insert_candidates(db_url, 10)
    with engine_for(db_url) as engine:
        service = leases(engine, batch_size=10, max_attempts=2)
        worker = new_worker(engine, "w")
        for expected in ("pending", "failed"):
            lease = service.lease_download(worker)
            assert lease is not None
            expire(engine, lease.batch_id)
            assert service.reap() == [(lease.batch_id, expected)]
        assert service.lease_download(worker) is None
        with engine.connect() as conn:
            row = conn.execute(sa.text("SELECT status, last_error FROM batches")).one()
        assert row.status == "failed" and "expired (attempt 2 of 2)" in row.last_error


def test_heartbeat_extends_the_lease_and_survives_the_reaper(db_url: str) -> None:
    insert_candidates(db_url, 10)
    with engine_for(db_url) as engine:
        service = leases(engine, batch_size=10, lease_ttl_s=60)
        worker = new_worker(engine, "w")
        lease = service.lease_download(worker)
        assert lease is not None
        expire(engine, lease.batch_id)
        beat = service.heartbeat("download", lease.batch_id, worker, lease.lease_token)
        assert beat.lease_expires_at > lease.lease_expires_at
        assert service.reap() == []


def test_fencing_refuses_other_workers_and_wrong_tokens_and_changes_nothing(
        db_url: str) -> None:
    insert_candidates(db_url, 10)
    with engine_for(db_url) as engine:
        service = leases(engine, batch_size=10)
        owner, other = new_worker(engine, "owner"), new_worker(engine, "other")
        lease = service.lease_download(owner)
        assert lease is not None
        attempts = [
            (other, lease.lease_token),  # another worker's batch
            (owner, "not-the-lease-token"),  # wrong lease token
        ]
        for worker, token in attempts:
            with pytest.raises(LeaseConflict):
                service.complete_download(lease.batch_id, worker, report(token, 10))
            with pytest.raises(LeaseConflict):
                service.fail("download", lease.batch_id, worker,
                             FailReport(lease_token=token, reason="x"))
            with pytest.raises(LeaseConflict):
                service.heartbeat("download", lease.batch_id, worker, token)
        with pytest.raises(NotFound):
            service.heartbeat("download", 999, owner, lease.lease_token)
        with engine.connect() as conn:
            row = conn.execute(sa.text("SELECT status, worker_id, attempts FROM batches")).one()
        assert tuple(row) == ("leased", owner, 1)


def test_completion_is_validated_and_idempotent(db_url: str) -> None:
    insert_candidates(db_url, 10)
    with engine_for(db_url) as engine:
        service = leases(engine, batch_size=10)
        worker = new_worker(engine, "w")
        lease = service.lease_download(worker)
        assert lease is not None
        too_many = report(lease.lease_token, 11)
        with pytest.raises(InvalidReport, match="sum to 11"):
            service.complete_download(lease.batch_id, worker, too_many)
        unknown = report(lease.lease_token, 10).model_copy(update={"outcomes": {"meh": 10}})
        with pytest.raises(InvalidReport, match="unknown outcome"):
            service.complete_download(lease.batch_id, worker, unknown)
        good = report(lease.lease_token, 10, ok=7)
        first = service.complete_download(lease.batch_id, worker, good)
        again = service.complete_download(lease.batch_id, worker, good)
        assert first == again and first.status == BatchStatus.DOWNLOADED
        with pytest.raises(LeaseConflict):
            service.complete_download(lease.batch_id, worker, report(lease.lease_token, 10))
        with engine.connect() as conn:
            row = conn.execute(sa.text("SELECT outcomes, tar_sha256 FROM batches")).one()
        assert row.outcomes == {"ok": 7, "timeout": 3} and row.tar_sha256 == "0" * 64


def test_release_refunds_the_attempt_and_failure_counts(db_url: str) -> None:
    insert_candidates(db_url, 10)
    with engine_for(db_url) as engine:
        service = leases(engine, batch_size=10, max_attempts=2)
        worker = new_worker(engine, "w")
        lease = service.lease_download(worker)
        assert lease is not None
        released = service.fail("download", lease.batch_id, worker,
                                FailReport(lease_token=lease.lease_token, reason="shutdown",
                                           release=True))
        assert (released.status, released.attempts) == (BatchStatus.PENDING, 0)
        for expected in (BatchStatus.PENDING, BatchStatus.FAILED):
            lease = service.lease_download(worker)
            assert lease is not None
            state = service.fail("download", lease.batch_id, worker,
                                 FailReport(lease_token=lease.lease_token, reason="disk full"))
            assert state.status == expected


def test_a_failure_caused_by_the_worker_spends_no_attempt(db_url: str) -> None:
    """A worker that cannot write its shards fails the batch five times: the batch stays
    pending with no attempt spent (max_attempts 2), then completes on a healthy worker."""
    insert_candidates(db_url, 10)
    with engine_for(db_url) as engine:
        service = leases(engine, batch_size=10, max_attempts=2)
        broken, healthy = new_worker(engine, "broken"), new_worker(engine, "healthy")
        for _ in range(5):
            lease = service.lease_download(broken)
            assert lease is not None and lease.attempt == 1
            state = service.fail("download", lease.batch_id, broken, FailReport(
                lease_token=lease.lease_token, reason="create output directory: File exists",
                cause=FailCause.WORKER))
            assert (state.status, state.attempts) == (BatchStatus.PENDING, 0)
        with engine.connect() as conn:
            error = conn.execute(sa.text("SELECT last_error FROM batches")).scalar_one()
        assert error == ("download failed on the worker (no attempt spent): "
                         "create output directory: File exists")
        lease = service.lease_download(healthy)
        assert lease is not None and len(lease.candidates) == 10
        done = service.complete_download(lease.batch_id, healthy, report(lease.lease_token, 10))
        assert (done.status, done.attempts) == (BatchStatus.DOWNLOADED, 1)


def _fail_one(service: Leases, worker: int, reason: str = "disk full") -> None:
    lease = service.lease_download(worker)
    assert lease is not None
    service.fail("download", lease.batch_id, worker,
                 FailReport(lease_token=lease.lease_token, reason=reason, cause=FailCause.WORKER))


def test_a_worker_whose_batches_keep_failing_is_quarantined(db_url: str) -> None:
    """quarantine_after 3: two failures, a completion, two failures: still leasing; a
    third failure in a row: 429-like refusal, in the stats, while others lease on."""
    from coordinator.errors import Quarantined
    from coordinator.stats import farm_stats

    insert_candidates(db_url, 100)
    with engine_for(db_url) as engine:
        service = leases(engine, batch_size=10, quarantine_after=3, quarantine_s=900)
        broken, healthy = new_worker(engine, "broken"), new_worker(engine, "healthy")
        _fail_one(service, broken)
        _fail_one(service, broken)
        lease = service.lease_download(broken)
        assert lease is not None
        service.complete_download(lease.batch_id, broken, report(lease.lease_token, 10))
        _fail_one(service, broken)
        _fail_one(service, broken)
        _fail_one(service, broken, "create output directory: File exists")
        with pytest.raises(Quarantined, match="3 batches in a row failed on this worker, "
                                              "the last: create output directory") as info:
            service.lease_download(broken)
        assert 890 < info.value.retry_after_s <= 900
        assert service.lease_download(healthy) is not None
        listed = {w.name: w for w in farm_stats(engine, 900).workers}
        assert listed["broken"].quarantined_until is not None
        assert "File exists" in (listed["broken"].quarantine_reason or "")
        assert listed["healthy"].quarantined_until is None
        with engine.begin() as conn:  # the quarantine ends
            conn.execute(sa.text("UPDATE workers SET quarantined_until = now() "
                                 "- interval '1 s' WHERE name = 'broken'"))
        assert service.lease_download(broken) is not None


def test_postprocess_leases_written_shards_and_completes_them(db_url: str) -> None:
    insert_candidates(db_url, 20)
    with engine_for(db_url) as engine:
        service = leases(engine, batch_size=10)
        worker, gpu = new_worker(engine, "w"), new_worker(engine, "g", role="gpu")
        assert service.lease_postprocess(gpu) is None, "nothing downloaded yet"
        lease = service.lease_download(worker)
        assert lease is not None
        service.complete_download(lease.batch_id, worker, report(lease.lease_token, 10, ok=6))
        pp = service.lease_postprocess(gpu)
        assert pp is not None and pp.batch_id == lease.batch_id and pp.count == 6
        assert pp.shard.tar == "s/00000001.tar"
        assert service.lease_postprocess(gpu) is None, "one holder at a time"
        expire(engine, pp.batch_id)
        assert service.reap() == [(pp.batch_id, "downloaded")]
        pp2 = service.lease_postprocess(gpu)
        assert pp2 is not None and pp2.attempt == 2
        from pairfarm.protocol import PostprocessReport

        bad = PostprocessReport(lease_token=pp2.lease_token, kept=5, dropped=2, duration_s=1)
        with pytest.raises(InvalidReport, match="holds 6"):
            service.complete_postprocess(pp2.batch_id, gpu, bad)
        stale = PostprocessReport(lease_token=pp.lease_token, kept=5, dropped=1, duration_s=1)
        with pytest.raises(LeaseConflict):
            service.complete_postprocess(pp2.batch_id, gpu, stale)
        good = PostprocessReport(lease_token=pp2.lease_token, kept=5, dropped=1,
                                 drop_reasons={"clip": 1}, duration_s=1)
        done = service.complete_postprocess(pp2.batch_id, gpu, good)
        assert done.status == BatchStatus.DONE
        assert service.complete_postprocess(pp2.batch_id, gpu, good) == done


def test_a_client_is_marked_seen_once_per_interval(db_url: str) -> None:
    from coordinator.tokens import SeenCache, authenticate, create_token

    def last_seen(engine: sa.Engine) -> object:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT last_seen_at FROM workers")).scalar_one()

    with engine_for(db_url) as engine:
        info = authenticate(engine, create_token(engine, "worker", "w")[1])
        cached = SeenCache(interval_s=3600)
        wid = cached.worker_id(engine, info)
        first = last_seen(engine)
        assert cached.worker_id(engine, info) == wid
        assert last_seen(engine) == first, "a second call within the interval writes nothing"
        assert cached.touch(engine, info, name="renamed") == wid
        assert last_seen(engine) != first, "register always writes"
        every_call = SeenCache(interval_s=0)
        before = last_seen(engine)
        assert every_call.worker_id(engine, info) == wid
        assert last_seen(engine) != before


def _batch_ids_drawn(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT last_value FROM batches_id_seq")).scalar_one())


def _add_retry(engine: sa.Engine, due: bool) -> int:
    """A drained candidate waits for a retry, due now or in an hour; its id."""
    with engine.begin() as conn:
        return int(conn.execute(sa.text(
            "INSERT INTO retry_chunks (ids, attempt, not_before) SELECT ARRAY[min(id)], 2, "
            "now() + CASE WHEN :due THEN interval '-1 s' ELSE interval '1 h' END "
            "FROM candidates RETURNING ids[1]"), {"due": due}).scalar_one())


def test_an_empty_queue_answers_none_without_forming_a_batch(db_url: str) -> None:
    """Drained, with only a retry that is not yet due: a lease draws no batch id (the
    insert of a batch that would be rolled back draws one) and answers None."""
    insert_candidates(db_url, 20)
    with engine_for(db_url) as engine:
        service = leases(engine, batch_size=10)
        worker = new_worker(engine, "idle")
        assert len(_drain(service, worker)) == 2
        _add_retry(engine, due=False)
        drawn = _batch_ids_drawn(engine)
        assert [service.lease_download(worker) for _ in range(5)] == [None] * 5
        assert _batch_ids_drawn(engine) == drawn


def test_the_emptiness_probe_runs_only_after_a_lease_that_was_not_full(db_url: str) -> None:
    """While batches come out full the queue is not empty: the next lease forms at once.
    After a short batch the probe runs again, and a drained queue draws no batch id."""
    insert_candidates(db_url, 25)
    with engine_for(db_url) as engine:
        service, worker = leases(engine, batch_size=10), new_worker(engine, "w")
        statements = _statements(engine)

        def probes() -> int:
            return statements.count(Q.anything_to_form.text)

        sizes = []
        for expected_probes in (1, 1, 1):
            lease = service.lease_download(worker)
            assert lease is not None
            sizes.append(len(lease.candidates))
            assert probes() == expected_probes
        assert sizes == [10, 10, 5]  # the first looked; the 2nd and 3rd followed full ones
        drawn = _batch_ids_drawn(engine)
        assert service.lease_download(worker) is None
        assert probes() == 2, "a lease after a short batch probes again"
        assert _batch_ids_drawn(engine) == drawn, "the probe answered: no batch formed"


def test_a_drained_queue_still_leases_a_due_retry(db_url: str) -> None:
    insert_candidates(db_url, 20)
    with engine_for(db_url) as engine:
        service = leases(engine, batch_size=10)
        worker = new_worker(engine, "w")
        _drain(service, worker)
        retried = _add_retry(engine, due=True)
        lease = service.lease_download(worker)
        assert lease is not None and [c.id for c in lease.candidates] == [retried]
        assert service.lease_download(worker) is None


def test_a_drained_queue_still_leases_a_released_batch(db_url: str) -> None:
    insert_candidates(db_url, 20)
    with engine_for(db_url) as engine:
        service = leases(engine, batch_size=20)
        worker = new_worker(engine, "w")
        lease = service.lease_download(worker)
        assert lease is not None and service.lease_download(worker) is None
        service.fail("download", lease.batch_id, worker,
                     FailReport(lease_token=lease.lease_token, reason="shutdown", release=True))
        again = service.lease_download(worker)
        assert again is not None and again.batch_id == lease.batch_id
        assert [c.id for c in again.candidates] == [c.id for c in lease.candidates]


def test_a_lease_ahead_never_takes_the_last_batch(db_url: str) -> None:
    """Three batches' worth: worker A's lease-ahead gets the second while a third is left,
    not the third; worker B (nothing in hand) gets the third, and A's next lease-ahead
    finds nothing. The refused lease-ahead draws no batch (its transaction rolls back)."""
    insert_candidates(db_url, 30)
    with engine_for(db_url) as engine:
        service = leases(engine, batch_size=10)
        a, b = new_worker(engine, "a"), new_worker(engine, "b")
        first = service.lease_download(a)
        second = service.lease_download(a, ahead=True)
        assert first is not None and second is not None
        drawn = _batch_ids_drawn(engine)
        assert service.lease_download(a, ahead=True) is None  # the last batch: kept
        assert _batch_ids_drawn(engine) == drawn + 1  # drawn, rolled back: nothing stored
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM batches")).scalar_one() == 2
        third = service.lease_download(b)
        assert third is not None and len(third.candidates) == 10
        assert service.lease_download(a, ahead=True) is None
        _assert_exactly_once([[c.id for c in lease.candidates]
                              for lease in (first, second, third)], _all_ids(engine))


def test_a_lease_ahead_does_not_take_the_last_released_batch(db_url: str) -> None:
    insert_candidates(db_url, 20)
    with engine_for(db_url) as engine:
        service = leases(engine, batch_size=10)
        a, b = new_worker(engine, "a"), new_worker(engine, "b")
        held = service.lease_download(a)
        given_back = service.lease_download(b)
        assert held is not None and given_back is not None
        service.fail("download", given_back.batch_id, b, FailReport(
            lease_token=given_back.lease_token, reason="shutdown", release=True))
        assert service.lease_download(a, ahead=True) is None
        again = service.lease_download(b)
        assert again is not None and again.batch_id == given_back.batch_id


# -- the empty-queue hold ---------------------------------------------------------------

class _Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _held_service(engine: sa.Engine, clock: _Clock, **kw: float) -> Leases:
    settings = make_lease_settings(batch_size=10, empty_hold_s=5.0, **kw)  # type: ignore[arg-type]
    return Leases(engine, settings, make_metrics(), clock=clock)


def _statements(engine: sa.Engine) -> list[str]:
    """The SQL statements ``engine`` runs from now on."""
    seen: list[str] = []
    sa.event.listen(engine, "before_cursor_execute",
                    lambda _c, _cur, statement, *_: seen.append(statement))
    return seen


def _empty_answers(service: Leases) -> dict[str, float]:
    assert service.metrics is not None
    return {answered: service.metrics.empty_leases.labels(answered=answered)._value.get()
            for answered in ("held", "looked")}


def test_an_empty_queue_is_answered_without_a_transaction_for_the_hold(db_url: str) -> None:
    """Drained: the first lease looks and finds nothing; within ``empty_hold_s`` the
    next ones run no statement (candidates ingested meanwhile wait for the hold's end)."""
    insert_candidates(db_url, 10)
    with engine_for(db_url) as engine:
        clock = _Clock()
        service, worker = _held_service(engine, clock), new_worker(engine, "w")
        assert service.lease_download(worker) is not None
        assert service.lease_download(worker) is None  # looked: nothing
        insert_candidates(db_url, 10, start=10)  # another process's ingest
        statements = _statements(engine)
        clock.now += 4.9
        assert service.lease_download(worker) is None
        assert service.lease_download(worker, ahead=True) is None
        assert statements == [], "a held answer runs no statement"
        assert _empty_answers(service) == {"held": 2, "looked": 1}
        clock.now += 0.2  # the hold is over: the next lease looks
        lease = service.lease_download(worker)
        assert lease is not None and sorted(c.id for c in lease.candidates) == \
            sorted(_all_ids(engine) - set(range(1, 11)))
        assert statements


def test_a_release_a_reap_or_a_retry_ends_the_hold_at_once(db_url: str) -> None:
    insert_candidates(db_url, 30)
    with engine_for(db_url) as engine:
        clock = _Clock()
        service = _held_service(engine, clock, url_retries=2, url_retry_delay_s=0.0)
        a, b, c = new_worker(engine, "a"), new_worker(engine, "b"), new_worker(engine, "c")
        held = [service.lease_download(w) for w in (a, b, c)]
        assert all(lease is not None for lease in held)
        first, second, third = (lease for lease in held if lease is not None)

        def held_empty() -> None:
            assert service.lease_download(c) is None
            assert service.lease_download(c) is None
            assert _empty_answers(service)["held"] >= 1

        held_empty()  # released: leased again at once
        service.fail("download", first.batch_id, a, FailReport(
            lease_token=first.lease_token, reason="shutdown", release=True))
        again = service.lease_download(c)
        assert again is not None and again.batch_id == first.batch_id

        held_empty()  # reaped: leased again at once
        expire(engine, second.batch_id)
        assert [e.batch_id for e in service.reap_expired()] == [second.batch_id]
        again = service.lease_download(c)
        assert again is not None and again.batch_id == second.batch_id

        held_empty()  # a URL sent back for a retry that is due at once: leased at once
        retried = third.candidates[0].id
        sent = report(third.lease_token, 10, ok=9).model_copy(
            update={"retry": {"timeout": [retried]}})
        service.complete_download(third.batch_id, c, sent)
        again = service.lease_download(c)
        assert again is not None and [x.id for x in again.candidates] == [retried]


def test_no_hold_with_empty_hold_zero(db_url: str) -> None:
    insert_candidates(db_url, 10)
    with engine_for(db_url) as engine:
        clock = _Clock()
        settings = make_lease_settings(batch_size=10, empty_hold_s=0.0)
        service, worker = Leases(engine, settings, make_metrics(), clock=clock), \
            new_worker(engine, "w")
        assert service.lease_download(worker) is not None
        assert service.lease_download(worker) is None
        insert_candidates(db_url, 10, start=10)
        assert service.lease_download(worker) is not None
        assert _empty_answers(service) == {"held": 0, "looked": 1}


def test_once_no_pending_candidate_was_found_leases_take_only_retries_for_the_hold(
        db_url: str) -> None:
    """A lease whose sample and whole index walk found no pending candidate: for
    ``empty_hold_s`` a lease with due retries takes them without sampling or walking
    pending_chunks again; after the hold it looks again (and finds what an ingest added).
    A lease that found some (a short last batch) holds nothing back."""
    insert_candidates(db_url, 15)
    with engine_for(db_url) as engine:
        clock = _Clock()
        service = _held_service(engine, clock, url_retries=2, url_retry_delay_s=0.0)
        worker = new_worker(engine, "w")
        first = service.lease_download(worker)
        assert first is not None and len(first.candidates) == 10
        second = service.lease_download(worker)  # the last 5: the index ran out
        assert second is not None and len(second.candidates) == 5
        statements = _statements(engine)

        def claims() -> list[str]:  # claim_sampled and claim_by_index
            return [s for s in statements if "TABLESAMPLE" in s or "WHERE id >= " in s]

        def send_back(lease: DownloadLease, n: int) -> list[int]:
            ids = [c.id for c in lease.candidates[:n]]
            service.complete_download(lease.batch_id, worker, report(
                lease.lease_token, len(lease.candidates), ok=len(lease.candidates) - n
            ).model_copy(update={"retry": {"timeout": ids}}))
            return ids

        retried = send_back(first, 3)
        lease = service.lease_download(worker)  # the 3 retries; pending found empty
        assert lease is not None and sorted(c.id for c in lease.candidates) == retried
        assert claims(), "the first lease after the drain looks at pending_chunks"
        statements.clear()
        retried = send_back(second, 2)
        insert_candidates(db_url, 5, start=15)  # another process's ingest
        lease = service.lease_download(worker)
        assert lease is not None and sorted(c.id for c in lease.candidates) == retried
        assert statements and claims() == [], "pending_chunks was looked at in the hold"
        clock.now += 5.1  # the hold is over: new candidates are seen again
        lease = service.lease_download(worker)
        assert lease is not None and sorted(c.id for c in lease.candidates) == \
            list(range(16, 21))
        assert claims()
