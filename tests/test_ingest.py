"""Ingest: every format, validation reasons, dedup, malformed files, re-runs."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Any

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
        {"URL": "http:///nohost.jpg", "TEXT": "no host here"},
        {"URL": "http://x.test/a b.jpg", "TEXT": "space in url"},
        {"URL": "http://x.test/" + "a" * 2100, "TEXT": "url far too long"},
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
        {"url": "http://A.test/1.jpg", "caption": "another host case"}])
    second = _write(tmp_path / "second.csv", [
        {"url": "http://a.test/1.jpg", "caption": "from the second file"},
        {"url": "http://a.test/2.jpg", "caption": "new in the second"}])
    out = _ingest(db_url, str(first), str(second)).stdout
    assert "read 5, inserted 3, duplicate 2" in out
    again = _ingest(db_url, str(first), str(second)).stdout
    assert "read 5, inserted 0, duplicate 5" in again
    captions = {r.url: r.caption for r in _candidates(db_url)}
    assert captions == {"http://a.test/1.jpg": "the first caption",
                        "http://A.test/1.jpg": "another host case",
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
