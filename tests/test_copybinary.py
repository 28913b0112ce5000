"""The ingest's binary COPY encoding, read back by a real PostgreSQL server."""

from __future__ import annotations

import json

import numpy as np
import psycopg
import pyarrow as pa
import pytest

from coordinator.db import libpq_url
from coordinator.ingest import copybinary
from coordinator.ingest.loader import candidates_copy, pending_chunks_copy
from coordinator.models import CHUNK_SIZE

HOSTILE = ['a"b', "", "x,\n\r\t\\y", "\\N", "ünï€😀", "'); DROP TABLE t; --",
           "\u2028\u2029", "{1,2}", "x" * 70_000, " lead and trail "]


def _copied(db_url: str, table: str, data: bytes) -> list[tuple[object, ...]]:
    with psycopg.connect(libpq_url(db_url)) as conn:
        conn.execute(f"CREATE TEMPORARY TABLE t ({table})")
        with conn.cursor() as cur, cur.copy("COPY t FROM STDIN (FORMAT binary)") as copy:
            copy.write(data)
        return conn.execute("SELECT * FROM t").fetchall()


def test_fields_of_each_type_read_back_as_written(db_url: str) -> None:
    n = len(HOSTILE)
    texts = pa.array([None if i % 4 == 1 else v for i, v in enumerate(HOSTILE)], pa.string())
    ids = np.array([0, 1, -1, 2**62, -(2**63), *range(5, 5 + n - 5)], np.int64)
    data = copybinary.copy_data([copybinary.int8_fields(ids), copybinary.text_fields(texts),
                                 copybinary.int4_fields(-7, n),
                                 copybinary.id_array_fields(100, 2 * n - 1, 2)])
    rows = _copied(db_url, "i bigint, s text, k integer, a bigint[]", data)
    assert [r[0] for r in rows] == ids.tolist()
    assert [r[1] for r in rows] == texts.to_pylist()
    assert {r[2] for r in rows} == {-7}
    assert [r[3] for r in rows] == [[100 + 2 * i, 101 + 2 * i] for i in range(n - 1)] + [
        [100 + 2 * n - 2]]


def test_sliced_and_chunked_text_keeps_its_rows(db_url: str) -> None:
    chunked = pa.chunked_array([pa.array(HOSTILE[:4]), pa.array(HOSTILE[4:])]).slice(2, 6)
    data = copybinary.copy_data([copybinary.text_fields(chunked)])
    assert [r[0] for r in _copied(db_url, "s text", data)] == HOSTILE[2:8]


def test_id_groups_cover_the_ids_once_in_order() -> None:
    for count, size in ((35, 16), (32, 16), (1, 16), (0, 16), (7, 1)):
        fields = copybinary.id_array_fields(1000, count, size)
        assert len(fields) == -(-count // size)
        sizes = [int.from_bytes(f[16:20], "big") for f in fields.to_pylist()]
        assert sizes == [size] * (count // size) + ([count % size] if count % size else [])


@pytest.mark.parametrize("count", [35, CHUNK_SIZE, 1])
def test_candidates_and_chunks_as_the_loader_writes_them(db_url: str, count: int) -> None:
    rows = pa.table({
        "url": [f"http://x.test/{i}" for i in range(count)],
        "caption": [HOSTILE[i % len(HOSTILE)] for i in range(count)],
        "language": [None if i % 3 else "en" for i in range(count)],
        "extra": [None if i % 4 else json.dumps({"note": HOSTILE[i % len(HOSTILE)]})
                  for i in range(count)],
    })
    stored = _copied(db_url, "id bigint, url text, caption text, language text, "
                     "ingest_id integer, extra json", candidates_copy(rows, 500, 9))
    assert [r[0] for r in stored] == list(range(500, 500 + count))
    assert [r[1:4] for r in stored] == list(zip(*(rows.column(k).to_pylist()
                                                  for k in ("url", "caption", "language")),
                                                strict=True))
    assert {r[4] for r in stored} == {9}
    assert [r[5] for r in stored] == [None if e is None else json.loads(e)
                                      for e in rows.column("extra").to_pylist()]
    with psycopg.connect(libpq_url(db_url)) as conn:
        conn.execute("CREATE TEMPORARY TABLE c (ids bigint[], url_j text, caption_j text, "
                      "language_j text, extra_j text)")
        with conn.cursor() as cur, cur.copy("COPY c FROM STDIN (FORMAT binary)") as copy:
            copy.write(pending_chunks_copy(rows, 500))
        chunks = conn.execute("SELECT ids, '[' || url_j || ']', '[' || caption_j || ']', "
                              "'[' || language_j || ']', '[' || extra_j || ']' FROM c").fetchall()
    assert [i for c in chunks for i in c[0]] == list(range(500, 500 + count))
    assert [len(c[0]) for c in chunks] == [len(json.loads(c[1])) for c in chunks]
    assert [u for c in chunks for u in json.loads(c[1])] == rows.column("url").to_pylist()
    assert [u for c in chunks for u in json.loads(c[2])] == rows.column("caption").to_pylist()
    assert [u for c in chunks for u in json.loads(c[3])] == rows.column("language").to_pylist()
