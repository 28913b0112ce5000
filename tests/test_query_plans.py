"""EXPLAIN guards: on 1M candidates no lease statement scans the candidates table or the
lease state table (pending_chunks) sequentially."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from coordinator.queries import Q
from tests.conftest import insert_candidates
from tests.leasing import engine_for, mark_batched

ROWS = 1_000_000


@pytest.fixture
def big_engine(db_url: str) -> Iterator[sa.Engine]:
    insert_candidates(db_url, ROWS)
    with engine_for(db_url) as engine:
        mark_batched(engine, "id < 900000")  # 90 % done: the index has real work to skip
        yield engine


def _plan(conn: sa.Connection, name: str, params: dict[str, Any]) -> str:
    sql = f"EXPLAIN (FORMAT TEXT) {Q.sql(name)}"
    return "\n".join(conn.execute(sa.text(sql), params).scalars())


CASES: dict[str, dict[str, Any]] = {
    "claim_sampled": {"pct": 1.0, "chunks": 625, "n": 10_000, "batch_id": 1,
                      "chunk_size": 16},
    "claim_by_index": {"start": 30_000, "chunks": 625, "n": 10_000, "batch_id": 1,
                       "chunk_size": 16},
    "batch_candidates": {"batch_id": 12_345},
    "max_chunk_id": {},
    "lease_pending_batch": {"worker_id": 1, "lease_token": "t", "ttl": 60.0,
                            "max_size": 10_000},
    "reap_expired": {"max_attempts": 3},
    "anything_to_form": {},
}


def test_lease_statements_never_scan_candidates_sequentially(big_engine: sa.Engine) -> None:
    with big_engine.begin() as conn:
        plans = {name: _plan(conn, name, params) for name, params in CASES.items()}
        conn.rollback()
    offenders = {n: p for n, p in plans.items()
                 if re.search(r"Seq Scan on (candidates|pending_chunks)", p)}
    assert offenders == {}
    assert "Sample Scan on pending_chunks" in plans["claim_sampled"]
    assert "Tid Scan on pending_chunks" in plans["claim_sampled"]
    assert "pending_chunks_pkey" in plans["claim_by_index"]
    assert "batch_members_pkey" in plans["batch_candidates"]
    assert "candidates_pkey" in plans["batch_candidates"]
    assert "pending_chunks_pkey" in plans["anything_to_form"]
    assert "retry_chunks_due" in plans["anything_to_form"]
    for name in ("claim_sampled", "claim_by_index"):
        assert not re.search(r"\bon candidates\b", plans[name]), f"{name} reads wide rows"
