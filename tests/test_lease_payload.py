"""The lease body from the chunks' JSON fragments: the loader's fragments, the claim's
split of a chunk, chunks without fragments, and every element equal to its row."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from coordinator.ingest.loader import chunk_fragments
from coordinator.ingest.run import ingest
from coordinator.ingest.validate import Columns
from coordinator.payload import Part, lease_body
from pairfarm.protocol import DownloadLease
from tests.conftest import insert_candidates
from tests.leasing import engine_for, leases, new_worker

HOSTILE = [
    'a "quoted", comma, caption',
    "back\\slash \\\" and \\u0041 written out",
    "tab\tand newline\nand bell\x07 inside",
    "ünïcödé 猫 🐈 and \u2028 line separator",
    "[1,2] {\"not\": \"json\"} ],[",
    "",
]


def _rows(count: int) -> list[dict[str, Any]]:
    return [{"url": f"http://h{i % 7}.test/p/{i}.jpg?q=a,b",
             "caption": f"{HOSTILE[i % len(HOSTILE)]} #{i:04d}",
             "width": 100 + i,
             "note": None if i % 5 == 0 else HOSTILE[(i + 1) % len(HOSTILE)],
             "score": i / 8}
            for i in range(count)]


def _ingest_rows(db_url: str, path: Path, count: int) -> None:
    pq.write_table(pa.Table.from_pylist(_rows(count)), path)
    summaries = ingest(db_url, [path], Columns())
    assert sum(s.inserted for s in summaries) == count


def _rows_of(engine: sa.Engine, ids: list[int]) -> dict[int, tuple[Any, ...]]:
    with engine.connect() as conn:
        return {r.id: (r.url, r.caption, r.language, r.extra or {}) for r in conn.execute(
            sa.text("SELECT id, url, caption, language, extra FROM candidates "
                    "WHERE id = ANY(:ids)"), {"ids": ids})}


def _check_lease(engine: sa.Engine, lease: DownloadLease) -> list[int]:
    """Every element of the lease equals its candidate's row; its ids."""
    rows = lease.candidates
    ids = [c.id for c in rows]
    stored = _rows_of(engine, ids)
    assert len(stored) == len(ids) == len(set(ids))
    for c in rows:
        assert (c.url, c.caption, c.language, dict(c.extra)) == stored[c.id], c.id
        assert c.attempt == 1
    return ids


def _drain(engine: sa.Engine, batch_size: int) -> list[list[int]]:
    service = leases(engine, batch_size=batch_size)
    worker = new_worker(engine, "payload")
    batches = []
    while (lease := service.lease_download(worker)) is not None:
        batches.append(_check_lease(engine, lease))
        _check_pending_fragments(engine)
    return batches


def _check_pending_fragments(engine: sa.Engine) -> None:
    """Every pending chunk that carries fragments has one element per id in each."""
    with engine.connect() as conn:
        bad = conn.execute(sa.text(
            "SELECT count(*) FROM pending_chunks WHERE url_j IS NOT NULL AND NOT ("
            "json_array_length(CAST('[' || url_j || ']' AS json)) = cardinality(ids) AND "
            "json_array_length(CAST('[' || caption_j || ']' AS json)) = cardinality(ids) AND "
            "json_array_length(CAST('[' || language_j || ']' AS json)) = cardinality(ids) "
            "AND json_array_length(CAST('[' || extra_j || ']' AS json)) = cardinality(ids))"
        )).scalar_one()
    assert bad == 0


def _fragment_count(engine: sa.Engine) -> tuple[int, int]:
    """Pending chunks with fragments, without."""
    with engine.connect() as conn:
        row = conn.execute(sa.text(
            "SELECT count(*) FILTER (WHERE url_j IS NOT NULL) AS carrying, "
            "count(*) FILTER (WHERE url_j IS NULL) AS bare FROM pending_chunks")).one()
    return int(row.carrying), int(row.bare)


# -- pure logic -----------------------------------------------------------------------

def test_lease_body_joins_parts_in_order_and_skips_empty_ones() -> None:
    a = Part(2, "1,2", '"u1","u,2"', '"c1","c\\"2"', 'null,"en"', '{},{"w":3}')
    empty = Part(0, "", "", "", "", "")
    b = Part(1, "7", '"u7"', '"c7"', '"de"', '{"x":[1,2]}', "3")
    body = json.loads(lease_body([a, empty, b]))
    assert body == {"id": [1, 2, 7], "url": ["u1", "u,2", "u7"],
                    "caption": ["c1", 'c"2', "c7"], "language": [None, "en", "de"],
                    "extra": [{}, {"w": 3}, {"x": [1, 2]}], "attempt": [1, 1, 3]}
    assert json.loads(lease_body([])) == {
        "id": [], "url": [], "caption": [], "language": [], "extra": [], "attempt": []}


def test_loader_fragments_hold_each_field_in_id_order() -> None:
    rows = pa.table({
        "url": [f"http://x.test/{i}" for i in range(35)],
        "caption": [HOSTILE[i % len(HOSTILE)] for i in range(35)],
        "language": [None if i % 3 else "en" for i in range(35)],
        "extra": [None if i % 4 else json.dumps({"note": HOSTILE[i % len(HOSTILE)]})
                  for i in range(35)],
    })
    groups = [[bytes(g).decode() if isinstance(g, bytes) else g for g in column.to_pylist()]
              for column in chunk_fragments(rows)]
    assert [len(json.loads("[" + g + "]")) for g in groups[0]] == [16, 16, 3]
    fields = [[v for g in column for v in json.loads("[" + g + "]")] for column in groups]
    assert fields[0] == rows.column("url").to_pylist()
    assert fields[1] == rows.column("caption").to_pylist()
    assert fields[2] == rows.column("language").to_pylist()
    assert fields[3] == [json.loads(e) if e else {} for e in rows.column("extra").to_pylist()]


# -- on PostgreSQL ----------------------------------------------------------------------

@pytest.mark.parametrize("batch_size", [37, 16, 500])
def test_leases_of_ingested_chunks_equal_the_rows_and_split_exactly(
        db_url: str, tmp_path: Path, batch_size: int) -> None:
    _ingest_rows(db_url, tmp_path / "in.parquet", 301)
    with engine_for(db_url) as engine:
        assert _fragment_count(engine) == (19, 0)
        batches = _drain(engine, batch_size)
        sizes = [len(b) for b in batches]
        assert sizes == [batch_size] * (301 // batch_size) + (
            [301 % batch_size] if 301 % batch_size else []), "full batches to the end"
        leased = [i for b in batches for i in b]
        assert len(leased) == len(set(leased)) == 301
        assert _fragment_count(engine) == (0, 0)


def test_a_split_chunk_goes_back_with_its_fragments(db_url: str, tmp_path: Path) -> None:
    _ingest_rows(db_url, tmp_path / "in.parquet", 64)
    with engine_for(db_url) as engine:
        service = leases(engine, batch_size=21)
        lease = service.lease_download(new_worker(engine, "split"))
        assert lease is not None and len(_check_lease(engine, lease)) == 21
        carrying, bare = _fragment_count(engine)
        assert bare == 0 and carrying >= 3, "the crossing chunk's rest carries fragments"
        _check_pending_fragments(engine)
        with engine.connect() as conn:
            pending = sorted(conn.execute(sa.text(
                "SELECT unnest(ids) FROM pending_chunks")).scalars())
        assert len(pending) == 64 - 21 and not set(pending) & {c.id for c in
                                                               lease.candidates}


def test_chunks_without_fragments_are_read_from_the_candidates(db_url: str,
                                                               tmp_path: Path) -> None:
    insert_candidates(db_url, 90, fragments=False)
    _ingest_rows(db_url, tmp_path / "in.parquet", 90)
    with engine_for(db_url) as engine:
        carrying, bare = _fragment_count(engine)
        assert carrying == 6 and bare == 6
        batches = _drain(engine, 25)
        assert [len(b) for b in batches] == [25] * 7 + [5]
        assert len({i for b in batches for i in b}) == 180


def test_a_relet_batch_has_the_same_candidates_in_the_same_order(db_url: str,
                                                            tmp_path: Path) -> None:
    _ingest_rows(db_url, tmp_path / "in.parquet", 100)
    with engine_for(db_url) as engine:
        service = leases(engine, batch_size=40)
        worker = new_worker(engine, "relet")
        first = service.lease_download(worker)
        assert first is not None
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE batches SET status = 'pending', worker_id = NULL, "
                                 "lease_token = NULL WHERE id = :id"),
                         {"id": first.batch_id})
        again = service.lease_download(worker)
        assert again is not None and again.batch_id == first.batch_id
        ids = _check_lease(engine, again)
        assert ids == _check_lease(engine, first), "same candidates, same keys"
