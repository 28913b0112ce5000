"""Ingest: every format, validation reasons, dedup, malformed files, re-runs."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Any
from uuid import UUID

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from coordinator.ingest.validate import Columns, validate
from tests.conftest import cli_env, run_cli
from tests.leasing import engine_for, pending_ids

ROWS: list[dict[str, Any]] = [
    {"url": "http://a.test/1.jpg", "caption": "a red bicycle", "width": 640, "score": 0.31},
    {"url": "https://b.test/2.png", "caption": "two cats on a sofa", "width": 800,
     "score": 0.25},
    {"url": "http://c.test/3.jpg", "caption": "a bowl of soup", "width": None, "score": 0.5},
]


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    name = path.name.removesuffix(".gz")
    opener: Any = gzip.open if path.suffix == ".gz" else open
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif name.endswith((".csv", ".tsv")):
        with opener(path, "wt", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]),
                                    delimiter="\t" if ".tsv" in name else ",")
            writer.writeheader()
            writer.writerows(rows)
    else:
        with opener(path, "wt") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def _candidates(db_url: str) -> list[Any]:
    with engine_for(db_url) as engine, engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT c.url, c.caption, c.language, c.extra, i.source "
            "FROM candidates c JOIN ingests i ON i.id = c.ingest_id ORDER BY c.id")).all()


def _ingest(db_url: str, *args: str, check: bool = True) -> Any:
    return run_cli("ingest", *args, env=cli_env(DATABASE_URL=db_url), check=check)


@pytest.mark.parametrize("name", ["in.parquet", "in.csv", "in.tsv", "in.jsonl",
                                  "in.csv.gz", "in.tsv.gz", "in.jsonl.gz"])
def test_each_format_loads_with_extra_columns(db_url: str, tmp_path: Path, name: str) -> None:
    path = _write(tmp_path / name, ROWS)
    out = _ingest(db_url, str(path)).stdout
    assert "read 3, inserted 3, duplicate 0, rejected 0" in out
    rows = _candidates(db_url)
    assert [(r.url, r.caption) for r in rows] == [(r["url"], r["caption"]) for r in ROWS]
    typed = name.endswith(("parquet", "jsonl", "jsonl.gz"))
    first = {"width": 640, "score": 0.31} if typed else {"width": "640", "score": "0.31"}
    assert rows[0].extra == first, "extra columns are kept as the input had them"
    assert "width" not in rows[2].extra, "a missing value is left out"
    assert rows[0].source == str(path)


def test_bad_rows_are_rejected_with_their_reason(db_url: str, tmp_path: Path) -> None:
    rows = [
        {"URL": "http://ok.test/a.jpg", "TEXT": "fine\tcaption\x07 here", "lang": "en"},
        {"URL": "", "TEXT": "no url at all"},
        {"URL": "ftp://x.test/a.jpg", "TEXT": "wrong scheme"},
        {"URL": "javascript:alert(1)", "TEXT": "not http"},
        {"URL": "http://", "TEXT": "no host here"},
        {"URL": "http://me:pw@x.test/a.jpg", "TEXT": "a password in the url"},
        {"URL": "http://x.test/" + "a" * 8200, "TEXT": "url far too long"},
        {"URL": "http://x.test/n.jpg", "TEXT": None},
        {"URL": "http://x.test/s.jpg", "TEXT": " abc "},
        {"URL": "http://x.test/l.jpg", "TEXT": "c" * 5000},
        {"URL": " http://ok.test/b.jpg\n", "TEXT": "trimmed url", "lang": "x" * 40},
    ]
    path = _write(tmp_path / "bad.jsonl", rows)
    rejects = tmp_path / "rejects.csv"
    out = _ingest(db_url, str(path), "--url-col", "URL", "--caption-col", "TEXT",
                  "--language-col", "lang", "--rejects", str(rejects)).stdout
    assert "read 11, inserted 2, duplicate 0, rejected 9" in out
    loaded = _candidates(db_url)
    assert [(r.url, r.caption, r.language) for r in loaded] == [
        ("http://ok.test/a.jpg", "fine caption  here", "en"),
        ("http://ok.test/b.jpg", "trimmed url", None)]
    with rejects.open() as handle:
        got = [(int(r["row"]), r["reason"]) for r in csv.DictReader(handle)]
    assert got == [(2, "missing_url"), (3, "not_http"), (4, "not_http"), (5, "bad_url"),
                   (6, "bad_url"), (7, "url_too_long"), (8, "missing_caption"),
                   (9, "caption_too_short"), (10, "caption_too_long")]


def test_exact_duplicates_first_ingested_wins_and_rerun_adds_nothing(
        db_url: str, tmp_path: Path) -> None:
    first = _write(tmp_path / "first.csv", [
        {"url": "http://a.test/1.jpg", "caption": "the first caption"},
        {"url": "http://a.test/1.jpg", "caption": "same url again"},
        {"url": "http://a.test/1.JPG", "caption": "another path case"}])
    second = _write(tmp_path / "second.csv", [
        {"url": "http://a.test/1.jpg", "caption": "from the second file"},
        {"url": "http://a.test/2.jpg", "caption": "new in the second"}])
    out = _ingest(db_url, str(first), str(second)).stdout
    assert "read 5, inserted 3, duplicate 2" in out
    again = _ingest(db_url, str(first), str(second)).stdout
    assert "read 5, inserted 0, duplicate 5" in again
    captions = {r.url: r.caption for r in _candidates(db_url)}
    assert captions == {"http://a.test/1.jpg": "the first caption",
                        "http://a.test/1.JPG": "another path case",
                        "http://a.test/2.jpg": "new in the second"}
    with engine_for(db_url) as engine, engine.connect() as conn:
        candidates = set(conn.execute(sa.text("SELECT id FROM candidates")).scalars())
        pending = pending_ids(engine)
    assert len(candidates) == 3
    assert pending == sorted(candidates), "each candidate in one pending chunk"


def test_malformed_csv_names_file_and_line_and_loads_nothing(db_url: str,
                                                            tmp_path: Path) -> None:
    good = _write(tmp_path / "good.csv", ROWS[:1])
    bad = tmp_path / "bad.csv"
    lines = ["url,caption"] + [f"http://x.test/{i}.jpg,caption {i}" for i in range(50)]
    lines.insert(31, "http://x.test/extra.jpg,caption,surplus field")
    bad.write_text("\n".join(lines) + "\n")
    out = _ingest(db_url, str(good), str(bad), check=False)
    assert out.returncode == 1
    assert f"{bad}: line 32: 3 fields, the header has 2" in out.stderr
    assert "nothing of this file was loaded" in out.stderr
    assert [r.url for r in _candidates(db_url)] == [ROWS[0]["url"]], "earlier files stay"


def test_malformed_jsonl_names_the_line(db_url: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl.gz"
    with gzip.open(bad, "wt") as handle:
        handle.write(json.dumps(ROWS[0]) + "\n" + '{"url": "http://x", "caption": \n')
    out = _ingest(db_url, str(bad), check=False)
    assert out.returncode == 1 and f"{bad}: line 2:" in out.stderr
    assert _candidates(db_url) == []


def _with_bad_byte(path: Path, lines: int, bad_line: int) -> Path:
    """A file of ``lines`` lines (CSV/TSV: the header is line 1) whose line ``bad_line``
    holds the byte 0xff inside its caption; captions of ~120 bytes put line 90,001 past
    Arrow's first 8 MB block and far past any text decoder's chunk."""
    name = path.name.removesuffix(".gz")
    pad = "x" * 100
    if name.endswith(".jsonl"):
        text = [json.dumps({"url": f"http://x.test/{i}.jpg", "caption": f"caption {i} {pad}"})
                .encode() for i in range(1, lines + 1)]
    else:
        sep = "\t" if name.endswith(".tsv") else ","
        text = [f"url{sep}caption".encode()] + [
            f"http://x.test/{i}.jpg{sep}caption {i} {pad}".encode() for i in range(2, lines + 1)]
    text[bad_line - 1] = text[bad_line - 1].replace(b"caption ", b"caption \xff", 1)
    data = b"\n".join(text) + b"\n"
    path.write_bytes(gzip.compress(data, compresslevel=1) if path.suffix == ".gz" else data)
    return path


@pytest.mark.parametrize("name", ["in.csv", "in.tsv", "in.jsonl", "in.csv.gz", "in.tsv.gz",
                                  "in.jsonl.gz"])
@pytest.mark.parametrize(("lines", "bad_line"), [(30, 15), (90_010, 90_001)])
def test_invalid_utf8_names_its_own_line_in_every_format(
        db_url: str, tmp_path: Path, name: str, lines: int, bad_line: int) -> None:
    path = _with_bad_byte(tmp_path / name, lines, bad_line)
    out = _ingest(db_url, str(path), check=False)
    assert out.returncode == 1
    assert (f"{path}: line {bad_line}: not valid UTF-8 (byte 0xff in column 'caption') "
            "(nothing of this file was loaded)") in out.stderr, out.stderr
    assert "codec" not in out.stderr and "COPY" not in out.stderr, "pairfarm's own words"
    assert _candidates(db_url) == []


def test_invalid_utf8_in_parquet_names_row_and_column(db_url: str, tmp_path: Path) -> None:
    urls = pa.array([f"http://x.test/{i}.jpg".encode() for i in range(1, 31)], pa.binary())
    raw = urls.to_pylist()
    raw[14] = b"http://x.test/\xff.jpg"
    as_bytes = pa.array(raw, pa.binary())
    # a string column holding the bytes as they are: what a careless writer leaves
    url = pa.Array.from_buffers(pa.string(), len(as_bytes), as_bytes.buffers())
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"url": url, "caption": [f"caption {i}" for i in range(30)]}),
                   path)
    out = _ingest(db_url, str(path), check=False)
    assert out.returncode == 1
    assert f"{path}: row 15, column 'url': not valid UTF-8 (byte 0xff)" in out.stderr, \
        out.stderr
    assert _candidates(db_url) == []


def test_a_header_that_is_not_utf8_is_line_1(db_url: str, tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(b"url,capt\xe9ion\nhttp://x.test/1.jpg,a caption\n")
    out = _ingest(db_url, str(path), check=False)
    assert out.returncode == 1
    assert f"{path}: line 1: not valid UTF-8 (byte 0xe9)" in out.stderr, out.stderr


def test_missing_column_and_unknown_format_are_clear_errors(db_url: str,
                                                           tmp_path: Path) -> None:
    path = _write(tmp_path / "in.csv", ROWS)
    out = _ingest(db_url, str(path), "--caption-col", "TEXT", check=False)
    assert out.returncode == 1 and "no caption column 'TEXT'" in out.stderr
    assert "--caption-col" in out.stderr
    odd = tmp_path / "in.xlsx"
    odd.write_text("x")
    out = _ingest(db_url, str(odd), check=False)
    assert out.returncode == 1 and "--input-format" in out.stderr


def test_validate_counts_reasons_and_numbers_rows() -> None:
    batch = pa.RecordBatch.from_pylist([
        {"url": "http://a.test/x", "caption": "long enough"},
        {"url": "gopher://a.test/x", "caption": "long enough"},
        {"url": None, "caption": "long enough"},
    ])
    checked = validate(batch, Columns(), first_row=101)
    assert checked.good.column("row").to_pylist() == [101]
    assert dict(checked.rejected) == {"not_http": 1, "missing_url": 1}
    assert checked.rejects.column("row").to_pylist() == [102, 103]


def test_prefetched_keeps_order_raises_in_place_and_closes_its_source() -> None:
    from collections.abc import Generator

    from coordinator.errors import IngestError
    from coordinator.ingest.run import prefetched

    closed: list[int | None] = []

    def chunks(fail_at: int | None) -> Generator[int, None, None]:
        try:
            for i in range(4):
                if i == fail_at:
                    raise IngestError(f"bad chunk {i}")
                yield i
        finally:
            closed.append(fail_at)

    assert list(prefetched(chunks(None))) == [0, 1, 2, 3]
    got: list[int] = []
    with pytest.raises(IngestError, match="bad chunk 2"):
        for i in prefetched(chunks(2)):
            got.append(i)
    assert got == [0, 1], "the chunks before the bad one were handed over first"
    early = prefetched(chunks(None))
    assert next(early) == 0
    early.close()
    assert closed == [None, 2, None], "the source is closed however the caller stops"


def test_extra_columns_become_one_json_object_per_row() -> None:
    """Input order and kinds kept, missing values left out, no object when all are
    missing, float32 by its shortest decimal, NaN and infinity as missing."""
    from coordinator.ingest.loader import extra_json

    batch = pa.record_batch({
        "url": ["http://a.test/1.jpg", "http://a.test/2.jpg", "http://a.test/3.jpg"],
        "caption": ["a red bicycle", "two cats on a sofa", "a bowl of soup"],
        "width": pa.array([640, None, None], pa.int32()),
        "score": pa.array([0.31, float("nan"), None], pa.float32()),
        "ok": [True, False, None],
        "note": ['say "hi"\\', None, None],
        "big": pa.array([2**62, None, None], pa.int64()),
        "far": pa.array([1.5, None, float("inf")], pa.float64()),
    })
    good = validate(batch, Columns(), 1).good
    objects = extra_json(good, good.schema.names[4:]).to_pylist()
    assert objects[0] == ('{"width":640,"score":0.31,"ok":true,"note":"say \\"hi\\"\\\\",'
                          '"big":4611686018427387904,"far":1.5}')
    assert objects[1] == '{"ok":false}'
    assert objects[2] is None
    assert json.loads(objects[0])["note"] == 'say "hi"\\'


def test_new_candidates_go_pending_in_chunks_of_consecutive_ids(db_url: str,
                                                                 tmp_path: Path) -> None:
    """40 rows, two of them duplicates: 38 candidates in chunks of 16, 16 and 6, each
    chunk a run of consecutive inserted ids."""
    rows = [{"url": f"http://h{i % 7}.test/{i}.jpg", "caption": f"caption number {i}"}
            for i in range(38)]
    rows[10:10] = [dict(rows[3])]
    rows[30:30] = [dict(rows[20])]
    _ingest(db_url, str(_write(tmp_path / "in.parquet", rows)))
    with engine_for(db_url) as engine, engine.connect() as conn:
        ids = list(conn.execute(sa.text("SELECT id FROM candidates ORDER BY id")).scalars())
        chunks = sorted(sorted(c) for c in conn.execute(
            sa.text("SELECT ids FROM pending_chunks")).scalars())
    assert [len(c) for c in chunks] == [16, 16, 6]
    assert [i for c in chunks for i in c] == ids


# -- the dedup: url_hashes -----------------------------------------------------------

def _counts(db_url: str) -> tuple[int, int, int, list[str]]:
    """candidates, url_hashes, pending ids, ingests' sources."""
    with engine_for(db_url) as engine, engine.connect() as conn:
        return (conn.execute(sa.text("SELECT count(*) FROM candidates")).scalar_one(),
                conn.execute(sa.text("SELECT count(*) FROM url_hashes")).scalar_one(),
                conn.execute(sa.text("SELECT coalesce(sum(cardinality(ids)), 0) "
                                     "FROM pending_chunks")).scalar_one(),
                list(conn.execute(sa.text("SELECT source FROM ingests ORDER BY id")
                                  ).scalars()))


def test_each_ingested_url_has_its_sha256_hash_and_no_text_index(db_url: str,
                                                                   tmp_path: Path) -> None:
    """url_hashes holds the first 16 bytes of the SHA-256 of each new URL as cleaned,
    the key the loader computes and the one the migration computes in SQL."""
    from coordinator.ingest.urlhash import url_hash
    from pairfarm.urls import clean_url

    urls = ["http://a.test/1.jpg", "http://b.test/é/ü.jpg?q=1"]
    _ingest(db_url, str(_write(tmp_path / "in.jsonl",
                                [{"url": u, "caption": "a caption"} for u in urls])))
    with engine_for(db_url) as engine, engine.connect() as conn:
        stored = set(conn.execute(sa.text("SELECT h FROM url_hashes")).scalars())
        in_sql = set(conn.execute(sa.text(
            "SELECT encode(substr(sha256(convert_to(url, 'UTF8')), 1, 16), 'hex')::uuid "
            "FROM candidates")).scalars())
        indexes = set(conn.execute(sa.text(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'candidates'")).scalars())
    assert {h.bytes for h in stored} == {url_hash(str(clean_url(u))) for u in urls}
    assert stored == in_sql
    assert indexes == {"candidates_pkey"}


def test_dedup_holds_for_a_url_whose_candidate_row_was_deleted(db_url: str,
                                                               tmp_path: Path) -> None:
    """The archive deletes finished candidates from ``candidates`` and keeps
    ``url_hashes``: their URLs still count as duplicates."""
    first = _write(tmp_path / "first.csv", ROWS)
    _ingest(db_url, str(first))
    with engine_for(db_url) as engine, engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM pending_chunks"))
        conn.execute(sa.text("DELETE FROM candidates"))
    later = _write(tmp_path / "later.csv", [
        {"url": ROWS[0]["url"], "caption": "archived long ago"},
        {"url": "http://d.test/4.jpg", "caption": "a new one"}])
    out = _ingest(db_url, str(later)).stdout
    assert "read 2, inserted 1, duplicate 1" in out
    assert [r.url for r in _candidates(db_url)] == ["http://d.test/4.jpg"]


def test_duplicates_across_chunks_of_one_file_first_wins(db_url: str,
                                                        tmp_path: Path) -> None:
    """A file of two chunks (131,072 rows a parquet chunk) whose second chunk repeats two
    URLs of the first, and a third file row that an earlier file holds: the first
    occurrence wins, each later one is counted once."""
    earlier = _write(tmp_path / "earlier.csv", [
        {"url": "http://x.test/1000.jpg", "caption": "from the earlier file"}])
    n = 131_072 + 10
    urls = [f"http://x.test/{i}.jpg" for i in range(n)]
    urls[131_072 + 3] = urls[5]
    urls[131_072 + 4] = urls[131_000]
    path = tmp_path / "two_chunks.parquet"
    pq.write_table(pa.table({"url": urls, "caption": [f"caption {i}" for i in range(n)]}),
                   path)
    out = _ingest(db_url, str(earlier), str(path)).stdout
    assert f"read {n + 1}, inserted {n - 2}, duplicate 3" in out
    with engine_for(db_url) as engine, engine.connect() as conn:
        captions = dict(conn.execute(sa.text(
            "SELECT url, caption FROM candidates WHERE url IN "
            "('http://x.test/5.jpg', 'http://x.test/131000.jpg', 'http://x.test/1000.jpg')")
        ).all())
    assert captions == {"http://x.test/5.jpg": "caption 5",
                        "http://x.test/131000.jpg": "caption 131000",
                        "http://x.test/1000.jpg": "from the earlier file"}
    candidates, hashes, pending, _ = _counts(db_url)
    assert candidates == hashes == pending == n - 2


@pytest.mark.parametrize("other_commits", [True, False])
def test_a_url_another_open_transaction_inserted_waits_for_it(
        db_url: str, tmp_path: Path, other_commits: bool) -> None:
    """Exact dedup with a concurrent ingest: while another transaction holds a URL's hash
    uncommitted, the ingest waits; it counts the URL a duplicate if that transaction
    commits, and loads it if it rolls back."""
    import threading
    import time

    import psycopg

    from coordinator.ingest.run import ingest
    from coordinator.ingest.urlhash import url_hash

    path = _write(tmp_path / "in.csv", ROWS)
    summaries: list[Any] = []
    with psycopg.connect(db_url.replace("+psycopg", "")) as other:
        other.execute("INSERT INTO url_hashes (h) VALUES (%s)",
                      [UUID(bytes=url_hash(ROWS[1]["url"]))])
        thread = threading.Thread(
            target=lambda: summaries.extend(ingest(db_url, [path], Columns())))
        thread.start()
        deadline = time.monotonic() + 60
        while not _waits_for_a_lock(db_url):
            assert time.monotonic() < deadline and thread.is_alive(), "the ingest never waited"
            time.sleep(0.05)
        if other_commits:
            other.commit()
        else:
            other.rollback()
        thread.join(60)
    [summary] = summaries
    assert (summary.inserted, summary.duplicates) == ((2, 1) if other_commits else (3, 0))
    assert (ROWS[1]["url"] in {r.url for r in _candidates(db_url)}) is not other_commits
    candidates, hashes, pending, _ = _counts(db_url)
    assert (candidates, hashes, pending) == ((2, 3, 2) if other_commits else (3, 3, 3))


def _waits_for_a_lock(db_url: str) -> bool:
    with engine_for(db_url) as engine, engine.connect() as conn:
        return bool(conn.execute(sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'")).scalar_one())


def test_kill_9_mid_file_leaves_nothing_of_that_file(db_url: str, tmp_path: Path) -> None:
    """``pairfarm ingest`` killed (SIGKILL) after it wrote part of a file: no candidate, no
    hash, no pending chunk and no ingest record of that file; the file loaded before it
    stays; a rerun loads the whole file."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    first = _write(tmp_path / "first.csv", ROWS)
    _ingest(db_url, str(first))
    n = 8 * 131_072
    big = tmp_path / "big.parquet"
    pq.write_table(pa.table({"url": [f"http://k.test/{i}.jpg" for i in range(n)],
                             "caption": [f"caption {i}" for i in range(n)]}), big)
    proc = subprocess.Popen([sys.executable, "-m", "pairfarm", "ingest", str(big)],
                            env=cli_env(DATABASE_URL=db_url), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while _hash_pages(db_url) == 0:
            assert proc.poll() is None, "the ingest ended before it wrote anything"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert proc.poll() is None, "the ingest ended before it was killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert _hash_pages(db_url) > 0, "the killed transaction had written hashes"
    assert _counts(db_url) == (3, 3, 3, [str(first)])
    out = _ingest(db_url, str(big)).stdout
    assert f"read {n}, inserted {n}, duplicate 0" in out
    assert _counts(db_url)[:3] == (n + 3, n + 3, n + 3)


def _hash_pages(db_url: str) -> int:
    """Pages of url_hashes past those of the first file (one page): written by an open
    transaction before it commits."""
    with engine_for(db_url) as engine, engine.connect() as conn:
        return int(conn.execute(sa.text(
            "SELECT pg_relation_size('url_hashes') / 8192 - 1")).scalar_one())


def test_id_blocks_are_consecutive_and_skip_ids_taken_meanwhile(db_url: str) -> None:
    import psycopg

    from coordinator.ingest.ids import IdBlocks

    with psycopg.connect(db_url.replace("+psycopg", ""), autocommit=True) as conn:
        blocks = IdBlocks(conn)
        first = blocks.reserve(100)
        taken = conn.execute("INSERT INTO candidates (url, caption) VALUES "
                             "('http://a.test/x.jpg', 'a caption') RETURNING id").fetchone()
        second = blocks.reserve(5)
        third = blocks.reserve(1)
        increment = conn.execute("SELECT increment_by FROM pg_sequences "
                                 "WHERE sequencename = 'candidates_id_seq'").fetchone()
    assert taken is not None and increment is not None
    assert (first, taken[0], second, third) == (1, 101, 102, 107)
    assert increment[0] == 1


def test_extra_json_escapes_text_and_keeps_whole_floats_floats() -> None:
    """The Arrow-built objects parse back to the input's values: quotes, backslashes,
    control characters and non-ASCII text, whole floats as floats, integers as integers."""
    from coordinator.ingest.loader import extra_json

    table = pa.table({"f": pa.array([2.0, None, -0.5, 1e20]),
                      "t": ['a "q" \\ é', "line\nbreak\x01", None, None],
                      "i": pa.array([None, 2**63 + 1, None, None], pa.uint64())})
    objects = extra_json(table, ["f", "t", "i"]).to_pylist()
    assert [json.loads(o) if o else o for o in objects] == [
        {"f": 2.0, "t": 'a "q" \\ é'}, {"t": "line\nbreak\x01", "i": 2**63 + 1},
        {"f": -0.5}, {"f": 1e20}]
    assert objects[0] is not None and objects[0].startswith('{"f":2.0,')


# -- URLs as browsers request them (pairfarm.urls) -------------------------------------

#: raw URLs as datasets and pages hold them, each with what a browser requests (None:
#: refused); shared by the ingest and the extract test
RAW_URLS: list[tuple[str, str | None]] = [
    ("http://u.test/plain.jpg", "http://u.test/plain.jpg"),
    ("http://u.test/a photo.jpg", "http://u.test/a%20photo.jpg"),
    ("http://u.test/a%20kept.jpg", "http://u.test/a%20kept.jpg"),
    ("https://u.test/bild/straße.jpg?größe=2", "https://u.test/bild/stra%C3%9Fe.jpg?"
     "gr%C3%B6%C3%9Fe=2"),
    ("https://Bücher.example/画像.png", "https://xn--bcher-kva.example/"
     "%E7%94%BB%E5%83%8F.png"),
    ("HTTP://U.Test:80/Upper.JPG#frag", "http://u.test/Upper.JPG"),
    ("http://u.test/a/../b/./c.jpg", "http://u.test/b/c.jpg"),
    ("https://u.test/long?x=" + "a" * 2600, "https://u.test/long?x=" + "a" * 2600),
    ("http://me:pw@u.test/secret.jpg", None),
    ("http://u.test/" + "é" * 3000, None),
]


def test_urls_are_cleaned_as_browsers_request_them(db_url: str, tmp_path: Path) -> None:
    """Spaces and non-ASCII percent-encoded, IDNA host, a 2,600-character URL kept; the
    stored URL (and so its dedup key) is the cleaned one: the same URL written another
    way is a duplicate."""
    from coordinator.ingest.urlhash import url_hash

    rows = [{"url": raw, "caption": f"caption number {i}"} for i, (raw, _) in
            enumerate(RAW_URLS)]
    rows.append({"url": "http://u.test/a%20photo.jpg", "caption": "the same, encoded"})
    rejects = tmp_path / "rejects.csv"
    out = _ingest(db_url, str(_write(tmp_path / "in.jsonl", rows)),
                  "--rejects", str(rejects)).stdout
    assert "read 11, inserted 8, duplicate 1, rejected 2" in out
    expected = [clean for _, clean in RAW_URLS if clean is not None]
    assert [r.url for r in _candidates(db_url)] == expected
    with rejects.open() as handle:
        got = [(r["reason"], r["url"][:30]) for r in csv.DictReader(handle)]
    assert got == [("bad_url", "http://me:pw@u.test/secret.jpg"),
                   ("url_too_long", "http://u.test/" + "é" * 16)]
    with engine_for(db_url) as engine, engine.connect() as conn:
        stored = {h.bytes for h in conn.execute(sa.text("SELECT h FROM url_hashes")).scalars()}
    assert stored == {url_hash(u) for u in expected}


def _ascii_and_odd_urls(count: int) -> list[str | None]:
    rnd = __import__("random").Random(3)
    hosts = ["x.test", "X.Test", "bücher.example", "x.test:80", "x.test:8080", "[::1]",
             "u:p@x.test", "", "a b"]
    pieces = ["/", "/", "a", "Z", "%20", "%", ".", "..", "%2e", " ", "é", "?", "#", "\\",
              "'", '"', "`", "{", "<", "|", "&", "="]
    urls: list[str | None] = [None, "", "  ", "ftp://x.test/a", "x.test/a"]
    while len(urls) < count:
        rest = "".join(rnd.choice(pieces) for _ in range(rnd.randrange(0, 8)))
        urls.append(rnd.choice(["http://", "https://", "HTTP://", " http://"])
                    + rnd.choice(hosts) + rnd.choice(["/", "", "?"]) + rest)
    return urls


def test_validate_cleans_each_url_as_clean_url_does() -> None:
    """Ingest's column checks (Arrow's RE2) and the one-by-one path agree with
    pairfarm.urls.clean_url on every row."""
    from pairfarm.urls import UrlProblem, clean_url

    urls = _ascii_and_odd_urls(3000)
    batch = pa.record_batch({"url": urls, "caption": ["a long enough caption"] * len(urls)})
    checked = validate(batch, Columns(), first_row=1)
    rejected = dict(zip(checked.rejects.column("row").to_pylist(),
                        checked.rejects.column("reason").to_pylist(), strict=True))
    kept = dict(zip(checked.good.column("row").to_pylist(),
                    checked.good.column("url").to_pylist(), strict=True))
    for row, url in enumerate(urls, start=1):
        expected = UrlProblem.MISSING if url is None else clean_url(url)
        if isinstance(expected, UrlProblem):
            assert rejected[row] == expected.value, url
        else:
            assert kept[row] == expected, url
    assert 300 < len(kept) < len(urls) - 300, "both paths and both results exercised"


def test_ingest_and_extract_write_the_same_urls(db_url: str, tmp_path: Path) -> None:
    """The same image URLs through ``pairfarm ingest`` (a jsonl of them) and through
    ``pairfarm extract`` (the src of <img> on a WAT page) come out identical."""
    import io

    from rich.console import Console

    from extract.runner import run_extract
    from extract.settings import build_settings
    from extract.watbuild import Img, WatPage, write_wat

    page = WatPage("https://page.test/", [Img(raw, f"image number {i} on the page")
                                          for i, (raw, _) in enumerate(RAW_URLS)])
    wat = write_wat(tmp_path / "p.wat.gz", [page])
    settings = build_settings(
        sources=[str(wat)], out_dir=tmp_path / "out", workers=1, rows_per_shard=1000,
        min_alt_chars=5, language_threshold=0.5, dedup_key="url+alt", bloom_path=None,
        use_bloom=False, bloom_capacity=1000, bloom_fpr=0.01, ingest=False)
    run = run_extract(settings, Console(file=io.StringIO()))
    extracted = pq.read_table(run.shards[0])["url"].to_pylist()
    assert run.counts.dropped == {"bad_url": 1, "url_too_long": 1}

    rows = [{"url": raw, "caption": f"image number {i} on the page"}
            for i, (raw, _) in enumerate(RAW_URLS)]
    _ingest(db_url, str(_write(tmp_path / "in.jsonl", rows)))
    ingested = [r.url for r in _candidates(db_url)]
    assert extracted == ingested == [c for _, c in RAW_URLS if c is not None]
