"""The dedup in waves: the Bloom filter, freezing a wave, exact dedup across waves, with
one job and two, a failed freeze, and the migration's way back."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import psycopg
import pytest
import sqlalchemy as sa

from coordinator.db import libpq_url
from coordinator.ingest.bloom import SplitBlockBloom, keys_of
from coordinator.ingest.run import ingest
from coordinator.ingest.urlhash import url_hash
from coordinator.ingest.validate import Columns
from coordinator.ingest.waves import FrozenWave, FrozenWaves, WaveCatalog, probe_on
from tests.conftest import cli_env, run_cli, url_csv
from tests.leasing import engine_for


def _random_hashes(seed: int, count: int) -> list[bytes]:
    data = np.random.default_rng(seed).bytes(16 * count)
    return [data[i:i + 16] for i in range(0, len(data), 16)]


# -- the filter ---------------------------------------------------------------------


def test_bloom_holds_every_key_added_and_few_others() -> None:
    added = _random_hashes(1, 200_000)
    bloom = SplitBlockBloom.for_keys(len(added))
    bloom.add(keys_of(added))
    assert bloom.may_contain(keys_of(added)).all()
    others = bloom.may_contain(keys_of(_random_hashes(2, 200_000)))
    assert 0 < others.mean() < 0.003  # 16 bits a key: ~0.13 %


def test_bloom_bits_per_key_trade_size_for_false_positives() -> None:
    added, others = keys_of(_random_hashes(3, 100_000)), keys_of(_random_hashes(4, 100_000))
    rates = []
    for bits in (8, 16):
        bloom = SplitBlockBloom.for_keys(100_000, bits)
        bloom.add(added)
        assert len(bloom.to_bytes()) == 100_000 * bits // 8
        rates.append(bloom.may_contain(others).mean())
    assert rates[0] > 5 * rates[1]


def test_bloom_round_trips_through_bytes_and_refuses_odd_lengths() -> None:
    keys = keys_of(_random_hashes(5, 1000))
    bloom = SplitBlockBloom.for_keys(1000)
    bloom.add(keys)
    again = SplitBlockBloom.from_bytes(bloom.to_bytes())
    assert np.array_equal(again.words, bloom.words)
    assert again.may_contain(keys).all()
    for bad in (b"", b"\x00" * 33):
        with pytest.raises(ValueError, match="multiple of 32"):
            SplitBlockBloom.from_bytes(bad)


def test_an_empty_filter_holds_nothing() -> None:
    bloom = SplitBlockBloom.for_keys(0)
    assert bloom.blocks == 1
    assert not bloom.may_contain(keys_of(_random_hashes(6, 100))).any()
    assert bloom.may_contain(keys_of([])).size == 0


# -- frozen waves on PostgreSQL -----------------------------------------------------


def _rows(db_url: str, query: str) -> list[Any]:
    with engine_for(db_url) as engine, engine.connect() as conn:
        return list(conn.execute(sa.text(query)))


def _waves(db_url: str) -> list[tuple[int, int, bool]]:
    return [(r.wave, r.hashes, r.frozen_at is not None) for r in
            _rows(db_url, "SELECT wave, hashes, frozen_at FROM url_waves ORDER BY wave")]


def _all_hashes(db_url: str) -> list[bytes]:
    """Every hash of every wave, current and frozen."""
    tables = ["url_hashes"] + [f"url_hashes_w{w}" for w, _, frozen in _waves(db_url)
                               if frozen]
    return [r.h.bytes for t in tables for r in _rows(db_url, f"SELECT h FROM {t}")]


def test_a_full_wave_is_frozen_and_its_urls_stay_duplicates(db_url: str,
                                                            tmp_path: Path) -> None:
    """With waves of 50, a first file of 80 new URLs fills wave 0, which is frozen after
    the file: renamed, its filter stored, an empty current wave. A second file with 40
    of those URLs and 40 new ones inserts only the new ones, into wave 1."""
    first = [f"http://a.test/{i}.jpg" for i in range(80)]
    second = first[40:] + [f"http://b.test/{i}.jpg" for i in range(40)]
    [one] = ingest(db_url, [url_csv(tmp_path / "one.csv", first)], Columns(), wave_size=50)
    assert (one.inserted, one.duplicates) == (80, 0)
    assert _waves(db_url) == [(0, 80, True), (1, 0, False)]
    assert _rows(db_url, "SELECT count(*) FROM url_hashes")[0][0] == 0
    [bloom] = _rows(db_url, "SELECT bloom FROM url_waves WHERE wave = 0")[0]
    assert SplitBlockBloom.from_bytes(bytes(bloom)).may_contain(
        keys_of([url_hash(u) for u in first])).all()

    [two] = ingest(db_url, [url_csv(tmp_path / "two.csv", second)], Columns(), wave_size=50)
    assert (two.inserted, two.duplicates) == (40, 40)
    assert _waves(db_url) == [(0, 80, True), (1, 40, False)]
    hashes = _all_hashes(db_url)
    assert len(hashes) == len(set(hashes)) == 120
    assert set(hashes) == {url_hash(u) for u in first + second}
    urls = [r.url for r in _rows(db_url, "SELECT url FROM candidates")]
    assert sorted(urls) == sorted(set(first + second))


def test_a_filters_maybe_is_looked_up_in_the_waves_table(db_url: str) -> None:
    """A filter that answers "maybe" for everything: only the hashes the frozen table
    holds come back."""
    held = _random_hashes(7, 30)
    with psycopg.connect(libpq_url(db_url), autocommit=True) as conn:
        conn.execute("CREATE TABLE url_hashes_w7 (h uuid PRIMARY KEY)")
        for h in held:
            conn.execute("INSERT INTO url_hashes_w7 (h) VALUES (%s)", [UUID(bytes=h)])
        everything = SplitBlockBloom(np.full((4, 8), 0xFFFFFFFF, dtype=np.uint32))
        frozen = FrozenWaves([FrozenWave(7, everything)], probe_on(conn))
        asked = held[:10] + _random_hashes(8, 10)
        assert frozen.present(asked) == set(held[:10])
        assert frozen.present([]) == set()


def test_two_jobs_across_freezes_keep_every_url_once(db_url: str, tmp_path: Path) -> None:
    """Eight overlapping files, two at a time, waves of 120: several freezes between
    files; every URL once in candidates and in exactly one wave."""
    files = [url_csv(tmp_path / f"f{k}.csv", [f"http://o.test/{i}.jpg"
                                          for i in range(k * 60, k * 60 + 100)])
             for k in range(8)]
    summaries = ingest(db_url, files, Columns(), jobs=2, wave_size=120)
    unique = 7 * 60 + 100
    assert sum(s.inserted for s in summaries) == unique
    assert sum(s.duplicates for s in summaries) == 800 - unique
    waves = _waves(db_url)
    assert sum(1 for _, _, frozen in waves if frozen) >= 2
    assert sum(n for _, n, _ in waves) == unique
    hashes = _all_hashes(db_url)
    assert len(hashes) == len(set(hashes)) == unique
    assert _rows(db_url, "SELECT count(DISTINCT url), count(*) FROM candidates")[0] == (
        unique, unique)


def test_cli_wave_size_freezes_and_a_rerun_inserts_nothing(db_url: str,
                                                           tmp_path: Path) -> None:
    path = url_csv(tmp_path / "in.csv", [f"http://c.test/{i}.jpg" for i in range(30)])
    env = cli_env(DATABASE_URL=db_url)
    out = run_cli("ingest", "--wave-size", "10", str(path), env=env).stdout
    assert "read 30, inserted 30, duplicate 0" in out
    out = run_cli("ingest", str(path), env=cli_env(DATABASE_URL=db_url,
                                                    PAIRFARM_INGEST_WAVE_SIZE="10")).stdout
    assert "read 30, inserted 0, duplicate 30" in out
    assert _waves(db_url) == [(0, 30, True), (1, 0, False)]
    refused = run_cli("ingest", "--wave-size", "0", str(path), env=env, check=False)
    assert refused.returncode == 2 and "--wave-size" in refused.stderr


def test_a_failed_freeze_changes_nothing_and_is_tried_again(
        db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A table already named url_hashes_w0 makes the freeze fail: logged, the wave stays
    current and whole, the next file still dedups against it; once the name is free the
    next file's end freezes it."""
    with psycopg.connect(libpq_url(db_url), autocommit=True) as conn:
        conn.execute("CREATE TABLE url_hashes_w0 (x int)")
    first = [f"http://f.test/{i}.jpg" for i in range(20)]
    with caplog.at_level(logging.WARNING, "coordinator.ingest.run"):
        ingest(db_url, [url_csv(tmp_path / "one.csv", first)], Columns(), wave_size=10)
    assert "could not be frozen" in caplog.text
    assert _waves(db_url) == [(0, 20, False)]
    assert _rows(db_url, "SELECT count(*) FROM url_hashes")[0][0] == 20

    with psycopg.connect(libpq_url(db_url), autocommit=True) as conn:
        conn.execute("DROP TABLE url_hashes_w0")
    [two] = ingest(db_url, [url_csv(tmp_path / "two.csv", [*first[:5], "http://g.test/1.jpg"])],
                   Columns(), wave_size=10)
    assert (two.inserted, two.duplicates) == (1, 5)
    assert _waves(db_url) == [(0, 21, True), (1, 0, False)]


def test_0010_downgrade_puts_frozen_waves_back_into_url_hashes(db_url: str,
                                                               tmp_path: Path) -> None:
    from alembic import command

    from tests.test_schema import _alembic

    urls = [f"http://d.test/{i}.jpg" for i in range(25)]
    ingest(db_url, [url_csv(tmp_path / "a.csv", urls[:12]), url_csv(tmp_path / "b.csv", urls[12:])],
           Columns(), wave_size=10)
    assert [frozen for _, _, frozen in _waves(db_url)] == [True, True, False]
    with engine_for(db_url) as engine:
        _alembic(engine, command.downgrade, "0009")
        with engine.connect() as conn:
            assert not sa.inspect(conn).has_table("url_waves")
            assert not sa.inspect(conn).has_table("url_hashes_w0")
        assert {r.h.bytes for r in _rows(db_url, "SELECT h FROM url_hashes")} == {
            url_hash(u) for u in urls}
        _alembic(engine, command.upgrade, "head")
    assert _waves(db_url) == [(0, 25, False)]


def test_a_frozen_waves_urls_stay_duplicates_after_their_candidates_left(
        db_url: str, tmp_path: Path) -> None:
    """The archive deletes finished candidates and keeps every wave: a URL of a frozen
    wave whose candidate row is gone is still a duplicate."""
    urls = [f"http://e.test/{i}.jpg" for i in range(15)]
    ingest(db_url, [url_csv(tmp_path / "a.csv", urls)], Columns(), wave_size=10)
    with engine_for(db_url) as engine, engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM pending_chunks"))
        conn.execute(sa.text("DELETE FROM candidates"))
    [again] = ingest(db_url, [url_csv(tmp_path / "b.csv", [*urls[::3], "http://e.test/new.jpg"])],
                     Columns(), wave_size=10)
    assert (again.inserted, again.duplicates) == (1, 5)
    assert [r.url for r in _rows(db_url, "SELECT url FROM candidates")] == [
        "http://e.test/new.jpg"]


def test_a_file_waits_for_a_freeze_in_progress(db_url: str, tmp_path: Path) -> None:
    """While a freeze holds the wave lock exclusive, a file does not begin loading (it
    would check the wrong set of frozen waves); it loads once the freeze ends."""
    path = url_csv(tmp_path / "in.csv", [f"http://h.test/{i}.jpg" for i in range(10)])
    with psycopg.connect(libpq_url(db_url)) as freezing:
        freezing.execute("SELECT pg_advisory_xact_lock(112102119097118101)")
        done: list[Any] = []
        thread = threading.Thread(target=lambda: done.append(
            ingest(db_url, [path], Columns())))
        thread.start()
        deadline = time.monotonic() + 60
        while not _rows(db_url, "SELECT count(*) FROM pg_locks WHERE locktype = "
                                "'advisory' AND NOT granted")[0][0]:
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.05)
        assert not done
        assert _rows(db_url, "SELECT count(*) FROM candidates")[0][0] == 0
        freezing.rollback()
    thread.join(60)
    assert done and done[0][0].inserted == 10


def test_a_freeze_in_another_process_makes_this_one_load_on(db_url: str) -> None:
    """While another session holds the freezer's lock, a full wave is left to it: no
    second filter is built, nothing changes; once released, the freeze happens."""
    insert = "INSERT INTO url_hashes (h) VALUES (%s)"
    with psycopg.connect(libpq_url(db_url), autocommit=True) as conn, \
            psycopg.connect(libpq_url(db_url), autocommit=True) as other:
        for h in _random_hashes(11, 12):
            conn.execute(insert, [UUID(bytes=h)])
        conn.execute("UPDATE url_waves SET hashes = 12")
        other.execute("SELECT pg_advisory_lock(112102102114101122)")
        assert WaveCatalog(wave_size=10).freeze_if_full(conn) is None
        assert _waves(db_url) == [(0, 12, False)]
        other.execute("SELECT pg_advisory_unlock(112102102114101122)")
        frozen = WaveCatalog(wave_size=10).freeze_if_full(conn)
    assert frozen is not None and frozen.hashes == 12
    assert _waves(db_url) == [(0, 12, True), (1, 0, False)]


def test_a_freeze_reads_every_hash_of_the_wave_page_range_by_page_range(db_url: str) -> None:
    from coordinator.ingest.waves import _wave_hashes

    hashes = _random_hashes(12, 1000)  # ~186 a heap page: 6 pages
    with psycopg.connect(libpq_url(db_url), autocommit=True) as conn:
        with conn.cursor() as cur, cur.copy("COPY url_hashes (h) FROM STDIN") as copy:
            for h in hashes:
                copy.write_row([UUID(bytes=h)])
        blocks = list(_wave_hashes(conn, pages=2))
    assert len(blocks) >= 3
    got = b"".join(blocks)
    assert sorted(got[i:i + 16] for i in range(0, len(got), 16)) == sorted(hashes)


def test_a_damaged_filter_is_a_clear_error_and_loads_nothing(db_url: str,
                                                            tmp_path: Path) -> None:
    ingest(db_url, [url_csv(tmp_path / "a.csv", ["http://i.test/1.jpg"])], Columns(),
           wave_size=1)
    with psycopg.connect(libpq_url(db_url), autocommit=True) as conn:
        conn.execute("UPDATE url_waves SET bloom = '\\x00'::bytea WHERE wave = 0")
    out = run_cli("ingest", str(url_csv(tmp_path / "b.csv", ["http://i.test/2.jpg"])),
                  env=cli_env(DATABASE_URL=db_url), check=False)
    assert out.returncode == 1
    assert "frozen wave 0 has a damaged filter" in out.stderr + out.stdout
    assert "nothing of this file was loaded" in out.stderr + out.stdout
    assert _rows(db_url, "SELECT count(*) FROM candidates")[0][0] == 1
