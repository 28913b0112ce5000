"""The bounded hot set: finished batches move into parquet files and out of the hot
tables (``pairfarm archive``, the coordinator's automatic mode), on real PostgreSQL.

Checked: the stats are the same before and after; a run that dies between its file and its
commit, or is killed with SIGKILL anywhere, loses and doubles nothing once run again; the
automatic mode keeps the hot set under its bound while leases go on; leases and requeue go
on on the hot batches, and archived ones can be neither leased nor requeued."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from coordinator.archive import (
    SCHEMA,
    Folder,
    archive,
    hot_candidates,
    pick_batches,
    write_file,
)
from coordinator.settings import ArchiveSettings, make_archive_settings
from coordinator.stats import farm_stats
from pairfarm.protocol import FailReport, PostprocessReport
from tests.conftest import (
    REPO,
    cli_env,
    insert_candidates,
    run_cli,
    start_coordinator,
)
from tests.leasing import engine_for, leases, new_worker, report
from tests.moto_s3 import moto_server, put_ok

EDGES = [0.0, 0.25, 0.5, 1.0]


class Crash(Exception):
    """Stands for the process dying between the file and the commit."""


def _libpq(db_url: str) -> str:
    return db_url.replace("+psycopg", "")


def _settings(folder: Path, **kw: Any) -> ArchiveSettings:
    return make_archive_settings(location=str(folder), **kw)


def _stats(engine: sa.Engine) -> dict[str, Any]:
    """The farm's figures, less what moves with the clock (the throughput chart's empty
    minutes: its hour may move on by a minute during a test)."""
    stats = farm_stats(engine, 900.0).model_dump(exclude={"generated_at"})
    for worker in stats["workers"]:
        worker.pop("last_seen_s")
    stats["throughput"] = [p for p in stats["throughput"] if p["candidates"]]
    return stats


def _run_farm(engine: sa.Engine, *, leased: int, done: int, failed: int,
              downloaded: int) -> dict[str, int]:
    """Through the real lease path: ``done`` batches post-processed, ``failed`` failed for
    good, ``downloaded`` waiting for post-processing, ``leased`` held; 100 candidates a
    batch. Returns the batch ids by what became of them."""
    service = leases(engine, batch_size=100, max_attempts=1)
    worker, gpu = new_worker(engine, "w1"), new_worker(engine, "g1", "gpu")
    fates: dict[str, int] = {}
    for i in range(done + failed + downloaded + leased):
        lease = service.lease_download(worker)
        assert lease is not None
        if i < failed:
            service.fail("download", lease.batch_id, worker,
                         FailReport(lease_token=lease.lease_token, reason="disk on fire"))
            fates[lease.batch_id] = "failed"
        elif i < failed + done + downloaded:
            service.complete_download(lease.batch_id, worker,
                                      report(lease.lease_token, 100, ok=70 + i % 5))
            fates[lease.batch_id] = "downloaded"
        else:
            fates[lease.batch_id] = "leased"
    for _ in range(done):
        pp = service.lease_postprocess(gpu)
        assert pp is not None
        kept = pp.count // 2
        service.complete_postprocess(pp.batch_id, gpu, PostprocessReport(
            lease_token=pp.lease_token, kept=kept, dropped=pp.count - kept,
            similarity_edges=EDGES, similarity_counts=[1, kept, pp.count - kept - 1],
            duration_s=1.0))
        fates[pp.batch_id] = "done"
    return fates


def _age(engine: sa.Engine, minutes: int) -> None:
    """Move every batch's clock ``minutes`` into the past (finished long enough ago, still
    within the dashboard's hour of throughput)."""
    with engine.begin() as conn:
        conn.execute(sa.text(
            "UPDATE batches SET created_at = created_at - make_interval(mins => :m), "
            "updated_at = updated_at - make_interval(mins => :m), "
            "downloaded_at = downloaded_at - make_interval(mins => :m), "
            "done_at = done_at - make_interval(mins => :m)"), {"m": minutes})


def _members(engine: sa.Engine, statuses: tuple[str, ...]) -> dict[int, int]:
    """candidate id -> batch id of the batches in ``statuses``."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT u.id, m.batch_id FROM batch_members m JOIN batches b ON b.id = m.batch_id,"
            " unnest(m.ids) AS u(id) WHERE b.status = ANY(:s)"), {"s": list(statuses)})
        return {int(r[0]): int(r[1]) for r in rows}


def _archived_rows(engine: sa.Engine, folder: Path) -> list[dict[str, Any]]:
    """Every row of the recorded files; the folder must hold no other archive file."""
    with engine.connect() as conn:
        names = set(conn.execute(sa.text("SELECT name FROM archives")).scalars())
    assert set(Folder(str(folder)).names()) == names
    rows: list[dict[str, Any]] = []
    for name in sorted(names):
        table = pq.read_table(folder / name)
        assert table.schema.equals(SCHEMA)
        rows.extend(table.to_pylist())
    return rows


def _hot_counts(engine: sa.Engine) -> tuple[int, int, int]:
    with engine.connect() as conn:
        return tuple(conn.execute(sa.text(  # type: ignore[return-value]
            "SELECT (SELECT count(*) FROM candidates), (SELECT count(*) FROM batch_members),"
            " (SELECT count(*) FROM batches)")).one())


def _check_archived_once(engine: sa.Engine, folder: Path, expected: dict[int, int]) -> None:
    """Each candidate of ``expected`` (id -> batch) in exactly one row of the recorded
    files, with its batch, and none of them, nor their batches, in the hot tables."""
    rows = _archived_rows(engine, folder)
    ids = Counter(r["candidate_id"] for r in rows)
    assert [i for i, n in ids.items() if n > 1] == []
    assert {r["candidate_id"]: r["batch_id"] for r in rows} == expected
    with engine.connect() as conn:
        left = conn.execute(sa.text("SELECT count(*) FROM candidates WHERE id = ANY(:ids)"),
                            {"ids": list(expected)}).scalar_one()
        batches = conn.execute(sa.text(
            "SELECT count(*) FROM batches WHERE id = ANY(:ids)"),
            {"ids": sorted(set(expected.values()))}).scalar_one()
    assert (left, batches) == (0, 0)


# -- stats and content ------------------------------------------------------------------

def test_archive_moves_finished_batches_and_keeps_the_farms_totals(
        db_url: str, tmp_path: Path) -> None:
    insert_candidates(db_url, 1500)
    with engine_for(db_url) as engine:
        fates = _run_farm(engine, done=4, failed=2, downloaded=2, leased=2)
        _age(engine, 20)
        with engine.connect() as conn:
            original = {r.id: r for r in conn.execute(sa.text(
                "SELECT id, url, caption, language, extra::text AS extra FROM candidates"))}
        finished = _members(engine, ("done", "failed"))
        before = _stats(engine)
        assert before["outcomes"] and before["kept"] and before["similarity"]["counts"]
        assert any(p["candidates"] for p in before["throughput"])
        hot = _hot_counts(engine)

        run = archive(db_url, _settings(tmp_path / "archive", file_candidates=250))

        assert run.batches == 6 and run.candidates == 600 == len(finished)
        assert len(run.files) == 3  # 250 candidates a file: two batches of 100 each
        assert (run.hot_before, run.hot_after) == (1500, 900)
        assert _stats(engine) == before
        assert _hot_counts(engine) == (hot[0] - 600, hot[1] - 6, hot[2] - 6)
        _check_archived_once(engine, tmp_path / "archive", finished)
        rows = _archived_rows(engine, tmp_path / "archive")
        for row in rows:
            source = original[row["candidate_id"]]
            assert (row["url"], row["caption"]) == (source.url, source.caption)
            assert row["batch_status"] == fates[row["batch_id"]]
        done = next(r for r in rows if r["batch_status"] == "done")
        assert '"ok"' in done["batch_outcomes"] and "00000001.tar" in done["shard"]
        assert done["kept"] is not None and done["done_at"] is not None
        failed = next(r for r in rows if r["batch_status"] == "failed")
        assert "disk on fire" in failed["last_error"] and failed["batch_outcomes"] is None

        again = archive(db_url, _settings(tmp_path / "archive"))
        assert (again.files, again.removed) == ((), ())
        assert _stats(engine) == before


def test_downloaded_batches_are_archived_only_when_asked(db_url: str, tmp_path: Path) -> None:
    """A farm without post-processing: its batches end ``downloaded``; ``downloaded``
    archives them with the finished ones, the stats unchanged, and none of them is
    leased for post-processing afterwards."""
    insert_candidates(db_url, 800)
    with engine_for(db_url) as engine:
        _run_farm(engine, done=1, failed=1, downloaded=3, leased=1)
        _age(engine, 20)
        before = _stats(engine)
        assert before["batches"]["downloaded"] == 3

        plain = archive(db_url, _settings(tmp_path / "archive"))
        assert plain.batches == 2  # done and failed only
        asked = archive(db_url, _settings(tmp_path / "archive", downloaded=True))

        assert (asked.batches, asked.candidates, asked.hot_after) == (3, 300, 300)
        assert _stats(engine) == before
        rows = _archived_rows(engine, tmp_path / "archive")
        assert Counter(r["batch_status"] for r in rows) == {
            "downloaded": 300, "done": 100, "failed": 100}
        assert leases(engine).lease_postprocess(new_worker(engine, "g2", "gpu")) is None
        with engine.connect() as conn:
            statuses = conn.execute(sa.text("SELECT status FROM batches")).scalars().all()
        assert statuses == ["leased"]


def test_recent_batches_stay_hot_until_min_age(db_url: str, tmp_path: Path) -> None:
    insert_candidates(db_url, 300)
    with engine_for(db_url) as engine:
        _run_farm(engine, done=1, failed=1, downloaded=0, leased=0)
        assert archive(db_url, _settings(tmp_path)).files == ()
        _age(engine, 11)
        assert archive(db_url, _settings(tmp_path)).candidates == 200


# -- interrupted runs ---------------------------------------------------------------------

def test_crash_between_file_and_commit_loses_and_doubles_nothing(
        db_url: str, tmp_path: Path) -> None:
    insert_candidates(db_url, 1000)
    folder = tmp_path / "archive"
    with engine_for(db_url) as engine:
        _run_farm(engine, done=3, failed=3, downloaded=1, leased=1)
        _age(engine, 20)
        finished = _members(engine, ("done", "failed"))
        before, hot = _stats(engine), _hot_counts(engine)
        small = _settings(folder, file_candidates=150)
        with (psycopg.connect(_libpq(db_url), autocommit=True) as conn,
              pytest.raises(Crash), conn.transaction()):
            picked = pick_batches(conn, small)
            written = write_file(conn, Folder(str(folder)), picked)
            raise Crash
        assert (folder / written.name).exists()
        (folder / "batches-000000000009-000000000009.parquet.tmp").write_bytes(b"half")
        assert _hot_counts(engine) == hot and _stats(engine) == before

        run = archive(db_url, _settings(folder, file_candidates=400))

        assert sorted(run.removed) == sorted([
            written.name, "batches-000000000009-000000000009.parquet.tmp"])
        assert run.candidates == 600
        _check_archived_once(engine, folder, finished)
        assert _stats(engine) == before


def _archive_proc(db_url: str, folder: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "pairfarm", "archive", "--to", str(folder),
         "--file-candidates", "100", "--min-age", "0"],
        env=cli_env(DATABASE_URL=db_url), cwd=REPO, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)


def _kill_when(proc: subprocess.Popen[bytes], ready: Any, timeout: float = 60) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()``; False when it ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    proc.wait(timeout=60)
    return False


def _finish_batches(db_url: str, batches: int, size: int, worker: int) -> None:
    """``batches`` finished batches of ``size`` candidates (ids 1..), as SQL: every tenth
    failed, the others done with outcomes, a shard and a post-processing report."""
    with psycopg.connect(_libpq(db_url), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO batches (id, status, size, attempts, pp_attempts, outcomes, shard,"
            " bytes_downloaded, kept, dropped, downloaded_by, downloaded_at, done_at,"
            " last_error, postprocess, created_at, updated_at)"
            " SELECT g, CASE WHEN g %% 10 = 0 THEN 'failed' ELSE 'done' END, %(s)s, 1, 1,"
            " CASE WHEN g %% 10 = 0 THEN NULL ELSE jsonb_build_object('ok', %(s)s - 3,"
            "   'timeout', 3) END,"
            " CASE WHEN g %% 10 = 0 THEN NULL ELSE jsonb_build_object('tar', 's/' || g || '.tar')"
            "   END, 1000 * g, %(s)s / 2, %(s)s - 3 - %(s)s / 2, %(w)s,"
            " now() - interval '20 min', now() - interval '19 min',"
            " CASE WHEN g %% 10 = 0 THEN 'download failed: gone' END,"
            " jsonb_build_object('similarity_edges', '[0, 0.5, 1]'::jsonb,"
            "   'similarity_counts', jsonb_build_array(g, 2 * g)),"
            " now() - interval '30 min', now() - interval '19 min'"
            " FROM generate_series(1, %(b)s) AS g",
            {"s": size, "b": batches, "w": worker})
        conn.execute("SELECT setval(pg_get_serial_sequence('batches', 'id'), %(b)s)",
                     {"b": batches})
        conn.execute(
            "INSERT INTO batch_members (batch_id, ids) SELECT g, ARRAY(SELECT"
            " generate_series((g - 1) * %(s)s + 1, g * %(s)s)::bigint)"
            " FROM generate_series(1, %(b)s) AS g", {"s": size, "b": batches})
        conn.execute("DELETE FROM pending_chunks WHERE ids[1] <= %(n)s",
                     {"n": batches * size})


def test_archive_killed_anywhere_loses_and_doubles_nothing(
        db_url: str, tmp_path: Path) -> None:
    """``pairfarm archive`` in a subprocess, SIGKILLed while it writes a file, right after
    a commit, and mid-run; each rerun removes the unrecorded files, and the last one
    finishes: every candidate in exactly one recorded row, none left hot."""
    insert_candidates(db_url, 30_000)
    folder = tmp_path / "archive"
    with engine_for(db_url) as engine:
        _finish_batches(db_url, 300, 100, new_worker(engine, "w1"))
        finished = _members(engine, ("done", "failed"))
        before = _stats(engine)

        def recorded() -> int:
            with engine.connect() as conn:
                return int(conn.execute(sa.text("SELECT count(*) FROM archives")).scalar_one())

        def writing() -> bool:
            return any(n.endswith(".tmp") for n in os.listdir(folder)) if folder.exists() \
                else False

        kills = [_kill_when(_archive_proc(db_url, folder), writing)]
        start = recorded()
        kills.append(_kill_when(_archive_proc(db_url, folder), lambda: recorded() > start))
        start = recorded()
        kills.append(_kill_when(_archive_proc(db_url, folder),
                                lambda: recorded() >= start + 20))
        assert kills == [True, True, True]
        assert 0 < recorded() < 300

        run_cli("archive", "--to", str(folder), "--file-candidates", "100", "--min-age", "0",
                env=cli_env(DATABASE_URL=db_url))

        assert recorded() == 300
        _check_archived_once(engine, folder, finished)
        assert _stats(engine) == before
        assert _hot_counts(engine) == (0, 0, 0)


# -- the automatic mode -------------------------------------------------------------------

def test_coordinator_keeps_the_hot_set_under_its_bound_while_leases_go_on(
        db_url: str, tmp_path: Path) -> None:
    """A coordinator with --hot-max-candidates 400: waves of 300 candidates are ingested,
    leased, downloaded and post-processed; after each wave its archive brings the hot set
    back under 400, and every candidate ends archived once."""
    folder = tmp_path / "archive"
    coordinator = start_coordinator(
        db_url, tmp_path / "coordinator.log", "--hot-max-candidates", "400",
        "--archive-to", str(folder), "--archive-min-age", "0", "--archive-interval", "0.1",
        "--archive-file-candidates", "200")
    try:
        with engine_for(db_url) as engine:
            service = leases(engine, batch_size=100)
            worker, gpu = new_worker(engine, "w1"), new_worker(engine, "g1", "gpu")
            for wave in range(5):
                insert_candidates(db_url, 300, start=wave * 300)
                _download_and_postprocess(service, worker, gpu, batches=3)
                assert _wait_for(lambda: _hot(db_url) <= 400), _hot(db_url)
            assert service.lease_download(worker) is None
            assert _wait_for(lambda: _hot(db_url) <= 400)
            with engine.connect() as conn:
                archived = conn.execute(sa.text(
                    "SELECT sum(candidates) FROM archived_totals")).scalar_one()
            assert archived >= 1100
            rows = _archived_rows(engine, folder)
            assert len(rows) == len({r["candidate_id"] for r in rows}) == archived
            stats = farm_stats(engine, 900.0)
            assert stats.candidates_total == 1500
            assert stats.candidates_by_status["done"] == 1500
            assert stats.batches["done"] == 15
    finally:
        coordinator.stop()
    assert "Traceback" not in (tmp_path / "coordinator.log").read_text()


def _hot(db_url: str) -> int:
    with psycopg.connect(_libpq(db_url)) as conn:
        return hot_candidates(conn)


def _wait_for(condition: Any, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def _download_and_postprocess(service: Any, worker: int, gpu: int, batches: int) -> None:
    for _ in range(batches):
        lease = service.lease_download(worker)
        assert lease is not None, "a lease while the archive runs"
        service.complete_download(lease.batch_id, worker,
                                  report(lease.lease_token, len(lease.candidates)))
        pp = service.lease_postprocess(gpu)
        assert pp is not None
        service.complete_postprocess(pp.batch_id, gpu, PostprocessReport(
            lease_token=pp.lease_token, kept=pp.count, dropped=0, duration_s=1.0))


# -- leases and requeue around the archive ------------------------------------------------

def test_hot_batches_lease_and_requeue_archived_ones_do_not(
        db_url: str, tmp_path: Path) -> None:
    insert_candidates(db_url, 800)
    with engine_for(db_url) as engine:
        fates = _run_farm(engine, done=2, failed=2, downloaded=0, leased=0)
        _age(engine, 20)
        service = leases(engine, batch_size=100, max_attempts=1)
        worker = new_worker(engine, "w2")
        recent = service.lease_download(worker)
        assert recent is not None
        service.fail("download", recent.batch_id, worker,
                     FailReport(lease_token=recent.lease_token, reason="recent failure"))
        archived = _members(engine, ("done", "failed"))
        archived = {c: b for c, b in archived.items() if b != recent.batch_id}

        run = archive(db_url, _settings(tmp_path))
        assert run.candidates == 400 and len(archived) == 400

        env = cli_env(DATABASE_URL=db_url)
        old_failed = [str(b) for b, fate in fates.items() if fate == "failed"]
        out = run_cli("batches", "requeue", *(a for b in old_failed for a in ("--id", b)),
                      env=env).stdout
        assert "requeued 0 batches" in out
        out = run_cli("batches", "requeue", "--id", str(recent.batch_id), env=env).stdout
        assert "requeued 1 batches (100 candidates)" in out

        again = service.lease_download(worker)
        assert again is not None and again.batch_id == recent.batch_id
        assert [c.id for c in again.candidates] == [c.id for c in recent.candidates]
        seen = {c.id for c in again.candidates}
        while (lease := service.lease_download(worker)) is not None:
            seen.update(c.id for c in lease.candidates)
        assert seen.isdisjoint(archived)
        assert len(seen) == 800 - 400
        with engine.connect() as conn:
            statuses = set(conn.execute(sa.text("SELECT status FROM batches")).scalars())
        assert statuses == {"leased"}


# -- an object store --------------------------------------------------------------------

@pytest.fixture
def moto_s3(tmp_path: Path) -> Iterator[str]:
    """moto's S3 server on a free loopback port, with a bucket ``farm``."""
    pytest.importorskip("s3fs", reason="archiving to S3 needs pairfarm[s3] (s3fs)")
    pytest.importorskip("moto", reason="the loopback S3 server is moto[server] (dev extra)")
    with moto_server(tmp_path, "farm") as endpoint:
        yield endpoint


def test_archive_to_s3_removes_unrecorded_objects(db_url: str, moto_s3: str) -> None:
    """``pairfarm archive --to s3://...`` against a real S3 API (moto on loopback): the
    files appear under their names, the object a killed run left is removed, and the
    rows are the finished batches' candidates."""
    insert_candidates(db_url, 500)
    with engine_for(db_url) as engine:
        _run_farm(engine, done=2, failed=1, downloaded=0, leased=0)
        _age(engine, 20)
        finished = _members(engine, ("done", "failed"))
    assert put_ok(f"{moto_s3}/farm/archive/batches-000000000007-000000000009.parquet",
                   b"half a file")
    env = cli_env(DATABASE_URL=db_url, AWS_ENDPOINT_URL=moto_s3, AWS_ACCESS_KEY_ID="farm",
                  AWS_SECRET_ACCESS_KEY="farm", AWS_DEFAULT_REGION="us-east-1")
    out = run_cli("archive", "--to", "s3://farm/archive", "--file-candidates", "200",
                  env=env).stdout
    assert "archived 3 batches (300 candidates) into 2 files" in out
    assert "removed 1 unrecorded files" in out
    import s3fs

    fs = s3fs.S3FileSystem(key="farm", secret="farm", client_kwargs={
        "endpoint_url": moto_s3, "region_name": "us-east-1"})
    keys = sorted(fs.ls("farm/archive", detail=False))
    assert keys == ["farm/archive/batches-000000000001-000000000002.parquet",
                    "farm/archive/batches-000000000003-000000000003.parquet"]
    rows = [r for k in keys for r in pq.read_table(io.BytesIO(fs.cat_file(k))).to_pylist()]
    assert len(rows) == 300
    assert {r["candidate_id"]: r["batch_id"] for r in rows} == finished
    with engine_for(db_url) as engine, engine.connect() as conn:
        directories = set(conn.execute(sa.text("SELECT directory FROM archives")).scalars())
    assert directories == {"s3://farm/archive"}
