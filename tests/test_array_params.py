"""Array parameters sent as PostgreSQL array text (``coordinator.queries.int_array`` and
``text_array``) read back by a real server as the same elements, in order."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from coordinator.queries import int_array, text_array

HOSTILE = ["", "NULL", "null", "a,b", "{x}", '"', '""', "\\", "\\\\\"", "two words",
           " lead", "trail ", "é ü 漢字 🙂", "tab\there", "new\nline", "'", "}{,\"\\"]


def test_int_array_reads_back_in_order(engine: sa.Engine) -> None:
    values = [9_223_372_036_854_775_807, -9_223_372_036_854_775_808, 0, 7, 7, 3]
    with engine.connect() as conn:
        got = conn.execute(sa.text("SELECT CAST(:v AS bigint[])"),
                           {"v": int_array(values)}).scalar_one()
        empty = conn.execute(sa.text("SELECT cardinality(CAST(:v AS bigint[]))"),
                             {"v": int_array([])}).scalar_one()
    assert got == values
    assert empty == 0


def test_int_array_refuses_what_is_not_an_integer() -> None:
    with pytest.raises(ValueError):
        int_array(["1}, {2"])  # type: ignore[list-item]


def test_text_array_keeps_every_element_whole(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        got = conn.execute(sa.text("SELECT CAST(:v AS text[])"),
                           {"v": text_array(HOSTILE)}).scalar_one()
        zipped = conn.execute(sa.text(
            "SELECT array_agg(t ORDER BY i) FROM unnest(CAST(:i AS bigint[]), "
            "CAST(:t AS text[])) AS u(i, t)"),
            {"i": int_array(range(len(HOSTILE))), "t": text_array(HOSTILE)}).scalar_one()
    assert got == HOSTILE
    assert zipped == HOSTILE
