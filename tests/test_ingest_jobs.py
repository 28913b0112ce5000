"""Ingest: several files at once (--jobs), and a file that was a deadlock's victim."""

from __future__ import annotations

import csv
import threading
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa

from coordinator.ingest.reader import PARQUET_BATCH_ROWS
from coordinator.ingest.run import ingest
from coordinator.ingest.urlhash import url_hash
from coordinator.ingest.validate import Columns
from tests.conftest import cli_env, run_cli, url_csv
from tests.leasing import engine_for


def _scalar(db_url: str, query: str) -> Any:
    with engine_for(db_url) as engine, engine.connect() as conn:
        return conn.execute(sa.text(query)).scalar_one()


def _hold_hashes(conn: psycopg.Connection, *urls: str) -> None:
    for url in urls:
        conn.execute("INSERT INTO url_hashes (h) VALUES (%s)", [UUID(bytes=url_hash(url))])


def _wait_for(what: str, done: Any, thread: threading.Thread, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert thread.is_alive(), f"the ingest ended before {what}"
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


def _waits_for_a_lock(db_url: str) -> bool:
    return bool(_scalar(db_url, "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                                "current_database() AND wait_event_type = 'Lock'"))


def test_jobs_load_overlapping_files_each_url_once(db_url: str, tmp_path: Path) -> None:
    """Four files whose URLs overlap, two at a time: every URL once, each file's summary
    in the files' order, read = inserted + duplicates, one hash and one pending id each."""
    files = [url_csv(tmp_path / f"f{k}.csv", [f"http://o.test/{i}.jpg"
                                          for i in range(k * 60, k * 60 + 100)])
             for k in range(4)]
    out = run_cli("ingest", "--jobs", "2", *map(str, files),
                  env=cli_env(DATABASE_URL=db_url)).stdout
    unique = 3 * 60 + 100
    assert f"read 400, inserted {unique}, duplicate {400 - unique}" in out
    assert [line.split()[1] for line in out.splitlines()
            if line.strip().startswith("│ f")] == [f"f{k}.csv" for k in range(4)]
    assert _scalar(db_url, "SELECT count(DISTINCT url) FROM candidates") == unique
    assert _scalar(db_url, "SELECT count(*) FROM candidates") == unique
    assert _scalar(db_url, "SELECT count(*) FROM url_hashes") == unique
    assert _scalar(db_url, "SELECT count(*) FROM pending_chunks p, unnest(p.ids)") == unique


def test_a_file_waiting_for_a_hash_does_not_hold_back_the_next_file(
        db_url: str, tmp_path: Path) -> None:
    """With two jobs, while the first file waits for a URL hash another open transaction
    holds, the second file loads and commits; once that transaction commits, the first
    file finishes with the URL counted a duplicate."""
    first = url_csv(tmp_path / "first.csv", [f"http://w.test/{i}.jpg" for i in range(50)])
    second = url_csv(tmp_path / "second.csv", [f"http://x.test/{i}.jpg" for i in range(50)])
    summaries: list[Any] = []
    with psycopg.connect(db_url.replace("+psycopg", "")) as other:
        _hold_hashes(other, "http://w.test/7.jpg")
        thread = threading.Thread(target=lambda: summaries.extend(
            ingest(db_url, [first, second], Columns(), jobs=2)))
        thread.start()
        try:
            _wait_for("the second file committed", lambda: _scalar(
                db_url, "SELECT count(*) FROM candidates WHERE url LIKE 'http://x.test/%'")
                == 50, thread, seconds=30)
            assert _waits_for_a_lock(db_url), "the first file was not waiting"
            assert _scalar(db_url, "SELECT count(*) FROM candidates "
                                   "WHERE url LIKE 'http://w.test/%'") == 0
        finally:
            other.commit()
            thread.join(60)
    assert [(s.inserted, s.duplicates) for s in summaries] == [(49, 1), (50, 0)]
    assert _scalar(db_url, "SELECT count(*) FROM candidates") == 99


def test_a_deadlock_victim_file_is_loaded_again_with_its_rejects_once(
        db_url: str, tmp_path: Path) -> None:
    """The ingest inserted hash y (chunk 1) and waits for hash x, which another
    transaction holds; that transaction then asks for y: a deadlock, and PostgreSQL
    aborts the ingest (it checks first: deadlock_timeout 2 s against 60 s). The file is
    loaded again from its start once the other transaction rolls back: every row in, one
    ingests record, its rejected row in the rejects file once."""
    n = PARQUET_BATCH_ROWS + 1
    urls = [f"http://d.test/{i}.jpg" for i in range(n)]
    y, x = urls[5], urls[-1]  # chunk 1, chunk 2
    urls[9] = "ftp://d.test/not-http.jpg"
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"url": urls, "caption": [f"caption {i}" for i in range(n)]}),
                   path)
    rejects = tmp_path / "rejects.csv"
    name = db_url.rsplit("/", 1)[1]
    with psycopg.connect(db_url.replace("+psycopg", ""), autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {name} SET deadlock_timeout = '2s'")
    summaries: list[Any] = []
    with psycopg.connect(db_url.replace("+psycopg", "")) as other:
        other.execute("SET deadlock_timeout = '60s'")
        _hold_hashes(other, x)
        thread = threading.Thread(target=lambda: summaries.extend(
            ingest(db_url, [path], Columns(), rejects=rejects)))
        thread.start()
        try:
            _wait_for("the ingest waited for x", lambda: _waits_for_a_lock(db_url), thread)
            _hold_hashes(other, y)  # waits until the ingest is aborted
        finally:
            other.rollback()
            thread.join(120)
    [summary] = summaries
    assert (summary.read, summary.inserted, summary.duplicates) == (n, n - 1, 0)
    assert _scalar(db_url, "SELECT count(*) FROM candidates") == n - 1
    assert _scalar(db_url, "SELECT count(*) FROM url_hashes") == n - 1
    assert _scalar(db_url, "SELECT count(*) FROM ingests") == 1
    rows = list(csv.reader(rejects.read_text().splitlines()))
    assert rows[0] == ["file", "row", "reason", "url"]
    assert [r[1:] for r in rows[1:]] == [["10", "not_http", "ftp://d.test/not-http.jpg"]]


def test_chunks_go_to_the_server_in_runs_of_one_sorted_hash_copy(
        db_url: str, tmp_path: Path, monkeypatch: Any) -> None:
    """Chunks of 4 rows in runs of at least 8 rows: a URL repeated within a run is
    dropped before the server sees it, one repeated across runs is found by the server;
    each run's hashes are one sorted COPY of its distinct URLs' hashes; the first row
    wins either way."""
    from coordinator.ingest import reader
    from coordinator.ingest import run as run_module
    from coordinator.ingest.ids import IdBlocks
    from coordinator.ingest.loader import FileLoader
    from coordinator.ingest.urlhash import sorted_copy_binary

    monkeypatch.setattr(reader, "PARQUET_BATCH_ROWS", 4)
    monkeypatch.setattr(run_module, "RUN_ROWS", 8)
    urls = [f"http://r.test/{i}.jpg" for i in range(20)]
    urls[5] = urls[1]  # chunk 1 repeats chunk 0: same run
    urls[13] = urls[2]  # chunk 3 (second run) repeats chunk 0
    path = tmp_path / "runs.parquet"
    pq.write_table(pa.table({"url": urls, "caption": [f"caption {i}" for i in range(20)]}),
                   path)
    source = reader.detect(path, None)
    plain = db_url.replace("+psycopg", "")
    with psycopg.connect(plain, autocommit=True) as conn, \
            psycopg.connect(plain, autocommit=True) as id_conn, conn.transaction():
        loader = FileLoader(conn, source, IdBlocks(id_conn).reserve)
        runs = list(run_module._prepared(loader, source, Columns()))
        assert [len(r.chunks) for _, r in runs] == [3, 2]
        assert [len(checked) for checked, _ in runs] == [3, 2]
        expected = [sorted({url_hash(u) for u in urls[:12]}),
                    sorted({url_hash(u) for u in urls[12:]})]
        assert [r.hash_copy for _, r in runs] == [sorted_copy_binary(e) for e in expected]
        for _, r in runs:
            loader.write(r)
        summary = loader.finish()
    assert (summary.read, summary.inserted, summary.duplicates) == (20, 18, 2)
    with psycopg.connect(plain) as conn:
        loaded = [r[0] for r in conn.execute("SELECT url FROM candidates ORDER BY id")]
    assert loaded == [u for i, u in enumerate(urls) if i not in (5, 13)]


def test_a_runs_hashes_are_sorted_bytewise() -> None:
    """The COPY binary of a run equals its hashes sorted by their first 8 bytes in
    Python's bytes order (equal halves in the input's order) and framed row by row, the
    smallest and largest keys included."""
    import hashlib

    from coordinator.ingest import urlhash

    def reference(hashes: list[bytes]) -> bytes:
        return (urlhash.COPY_HEADER
                + b"".join(b"\x00\x01\x00\x00\x00\x10" + h
                           for h in sorted(hashes, key=lambda h: h[:8]))
                + urlhash.COPY_TRAILER)

    hashes = [hashlib.sha256(str(i).encode()).digest()[:16] for i in range(5000)]
    hashes += [b"\x00" * 16, b"\xff" * 16, b"\x7f" + b"\x00" * 15,
               b"\x01" * 8 + b"\x02" * 8, b"\x01" * 16]
    assert urlhash.sorted_copy_binary(hashes) == reference(hashes)
    assert urlhash.sorted_copy_binary(hashes[:1]) == reference(hashes[:1])
