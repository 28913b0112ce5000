"""The migrations produce exactly the models' schema; the named SQL parses and plans."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from coordinator.migrate import current_revision, head_revision, upgrade
from coordinator.models import Base
from coordinator.queries import Q, parse


def test_migrated_database_matches_models(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_drift_is_detected(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("DROP INDEX batches_pending"))
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    assert [d[0] for d in diff] == ["add_index"]


def test_upgrade_is_idempotent(db_url: str) -> None:
    upgrade(db_url)
    assert current_revision(db_url) == head_revision() is not None


def test_0002_moves_lease_state_out_of_candidates_and_back(db_url: str) -> None:
    """Downgrade to 0001 puts ``batch_id`` back on ``candidates``; upgrading again moves
    the unbatched candidates into ``pending_chunks`` and the batched ones into one
    ``batch_members`` array per batch."""
    from alembic import command

    from tests.conftest import insert_candidates
    from tests.leasing import mark_batched, pending_ids

    insert_candidates(db_url, 6)
    engine = sa.create_engine(db_url)
    try:
        mark_batched(engine, "id <= 3")
        with engine.connect() as conn:
            batch = conn.execute(sa.text("SELECT batch_id FROM batch_members")).scalar_one()
        expected = [(1, batch), (2, batch), (3, batch), (4, None), (5, None), (6, None)]
        _alembic(engine, command.downgrade, "0001")
        with engine.connect() as conn:
            assert _pairs(conn) == expected
            assert not sa.inspect(conn).has_table("pending_chunks")
            assert not sa.inspect(conn).has_table("batch_members")
        _alembic(engine, command.upgrade, "head")
        with engine.connect() as conn:
            storage = conn.execute(sa.text(
                "SELECT attstorage FROM pg_attribute "
                "WHERE attrelid = 'batch_members'::regclass AND attname = 'ids'")).scalar_one()
            assert storage == "e", "batch_members.ids is stored uncompressed"
            members = conn.execute(sa.text("SELECT batch_id, ids FROM batch_members"))
            assert [tuple(r) for r in members] == [(batch, [1, 2, 3])]
            columns = {c["name"] for c in sa.inspect(conn).get_columns("candidates")}
            assert "batch_id" not in columns
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        assert pending_ids(engine) == [4, 5, 6]
    finally:
        engine.dispose()


def test_0003_extra_becomes_json_and_back(db_url: str) -> None:
    """``candidates.extra`` is jsonb up to 0002 and json from 0003; the values survive
    both ways."""
    from alembic import command

    engine = sa.create_engine(db_url)
    insert = sa.text("INSERT INTO candidates (url, caption, extra) VALUES "
                     "('http://a.test/1.jpg', 'a caption', CAST(:extra AS json))")
    try:
        with engine.begin() as conn:
            conn.execute(insert, {"extra": '{"width": 640, "nsfw": "UNLIKELY"}'})
        _alembic(engine, command.downgrade, "0002")
        with engine.connect() as conn:
            assert _extra_type(conn) == "jsonb"
            assert conn.execute(sa.text("SELECT extra->>'width' FROM candidates")
                                ).scalar_one() == "640"
        _alembic(engine, command.upgrade, "head")
        with engine.connect() as conn:
            assert _extra_type(conn) == "json"
            assert conn.execute(sa.text("SELECT extra FROM candidates")).scalar_one() == {
                "width": 640, "nsfw": "UNLIKELY"}
    finally:
        engine.dispose()


def _extra_type(conn: sa.Connection) -> str:
    return str(conn.execute(sa.text(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = 'candidates'::regclass AND attname = 'extra'")).scalar_one())


def _alembic(engine: sa.Engine, step: object, revision: str) -> None:
    from coordinator.migrate import alembic_config

    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        step(config, revision)  # type: ignore[operator]


def _pairs(conn: sa.Connection) -> list[tuple[int, int | None]]:
    rows = conn.execute(sa.text("SELECT id, batch_id FROM candidates ORDER BY id"))
    return [(r.id, r.batch_id) for r in rows]


def test_every_named_statement_is_valid_sql(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            raw = conn.connection.driver_connection
            for name in Q.names():
                if name.startswith("ingest_"):  # psycopg templates, run by the ingest tests
                    continue
                sql = Q.sql(name)
                if name.startswith("archive_"):  # psycopg templates ("%(name)s")
                    if not sql.startswith("COPY"):  # COPY cannot be prepared
                        raw.execute(f"PREPARE p_{name} AS {_positional(sql)}")  # type: ignore[union-attr]
                    continue
                assert ":" in sql or "SELECT" in sql, name
                # PREPARE checks syntax and every name; parameters become untyped $n.
                statement = sa.text(sql).compile(dialect=engine.dialect)
                raw.execute(f"PREPARE p_{name} AS {_positional(str(statement))}")  # type: ignore[union-attr]
    finally:
        engine.dispose()


def _positional(compiled: str) -> str:
    import re

    names: list[str] = []

    def repl(m: re.Match[str]) -> str:
        if m.group(1) not in names:
            names.append(m.group(1))
        return f"${names.index(m.group(1)) + 1}"

    return re.sub(r"%\((\w+)\)s", repl, compiled)


def test_parse_splits_named_statements() -> None:
    src = "-- name: a\n-- a comment\nSELECT 1;\n\n-- name: b\nSELECT\n  2;\n"
    assert parse(src) == {"a": "SELECT 1", "b": "SELECT\n  2"}


def test_parse_splices_fragments_and_leaves_other_braces() -> None:
    src = ("-- name: _tail\n-- shared\nFROM t\n\n-- name: a\nSELECT x {_tail};\n\n"
           "-- name: b\nSELECT y {_tail} {extra};\n")
    assert parse(src) == {"a": "SELECT x FROM t", "b": "SELECT y FROM t {extra}"}


def test_url_uses_the_c_collation_in_models_and_database(db_url: str) -> None:
    """compare_metadata does not compare collations: check the one that matters here."""
    assert Base.metadata.tables["candidates"].c.url.type.collation == "C"  # type: ignore[attr-defined]
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            collation = conn.execute(sa.text(
                "SELECT collation_name FROM information_schema.columns "
                "WHERE table_name = 'candidates' AND column_name = 'url'")).scalar_one()
    finally:
        engine.dispose()
    assert collation == "C"


def test_0005_hashes_existing_urls_and_drops_the_text_index(db_url: str) -> None:
    """Candidates inserted at 0004 get their URL hash (the loader's key) on the upgrade,
    so a later ingest counts them as duplicates; the downgrade puts the unique index on
    ``candidates.url`` back."""
    from alembic import command

    from coordinator.ingest.urlhash import url_hash

    engine = sa.create_engine(db_url)
    indexes = sa.text("SELECT indexname FROM pg_indexes WHERE tablename = 'candidates'")
    try:
        _alembic(engine, command.downgrade, "0004")
        with engine.begin() as conn:
            assert set(conn.execute(indexes).scalars()) == {"candidates_pkey",
                                                            "candidates_url_key"}
            conn.execute(sa.text("INSERT INTO candidates (url, caption) VALUES "
                                 "('http://a.test/1.jpg', 'a caption'), "
                                 "('http://b.test/ü.jpg', 'a caption')"))
        _alembic(engine, command.upgrade, "head")
        with engine.connect() as conn:
            hashes = {h.bytes for h in conn.execute(sa.text("SELECT h FROM url_hashes")
                                                    ).scalars()}
            assert set(conn.execute(indexes).scalars()) == {"candidates_pkey"}
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        assert hashes == {url_hash("http://a.test/1.jpg"), url_hash("http://b.test/ü.jpg")}
        _alembic(engine, command.downgrade, "0004")
        with engine.connect() as conn:
            assert "candidates_url_key" in set(conn.execute(indexes).scalars())
            assert not sa.inspect(conn).has_table("url_hashes")
        _alembic(engine, command.upgrade, "head")
    finally:
        engine.dispose()


def test_0011_turns_url_retries_into_retry_chunks_and_back(db_url: str) -> None:
    """Waiting url_retries rows become retry chunks (by attempt, due at the latest of
    theirs); the attempts of rows a batch holds go to its members' attempts. The
    downgrade gives each candidate its row back."""
    from alembic import command

    engine = sa.create_engine(db_url)
    try:
        _alembic(engine, command.downgrade, "0010")
        with engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO batches (id, status) OVERRIDING SYSTEM VALUE VALUES (7, 'pending');"
                "INSERT INTO batch_members (batch_id, ids) VALUES (7, '{10,11,12}');"
                "INSERT INTO url_retries (id, attempt, not_before, batch_id) VALUES "
                "(11, 3, now(), 7), (20, 2, now() + interval '1 h', NULL), "
                "(21, 2, now() + interval '2 h', NULL), (22, 3, now(), NULL)"))
        _alembic(engine, command.upgrade, "head")
        with engine.connect() as conn:
            chunks = conn.execute(sa.text(
                "SELECT attempt, ids, round(extract(epoch FROM not_before - now()) / 3600) "
                "AS h FROM retry_chunks ORDER BY attempt")).all()
            members = conn.execute(sa.text(
                "SELECT ids, attempts FROM batch_members WHERE batch_id = 7")).one()
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        assert [tuple(c) for c in chunks] == [(2, [20, 21], 2), (3, [22], 0)]
        assert (members.ids, members.attempts) == ([10, 11, 12], [1, 3, 1])
        _alembic(engine, command.downgrade, "0010")
        with engine.connect() as conn:
            rows = conn.execute(sa.text(
                "SELECT id, attempt, batch_id FROM url_retries ORDER BY id")).all()
        assert [tuple(r) for r in rows] == [(11, 3, 7), (20, 2, None), (21, 2, None),
                                            (22, 3, None)]
        _alembic(engine, command.upgrade, "head")
    finally:
        engine.dispose()


def test_0012_lets_archived_totals_hold_downloaded_batches_and_guards_the_downgrade(
        db_url: str) -> None:
    """At head a downloaded batch's totals can be archived; below 0012 they cannot, and
    the downgrade refuses while such totals exist."""
    from alembic import command

    row = ("INSERT INTO archived_totals (status, batches, candidates, bytes_downloaded, "
           "kept, dropped) VALUES ('downloaded', 1, 10, 0, 0, 0)")
    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(row))
        with pytest.raises(RuntimeError, match="downloaded batches"):
            _alembic(engine, command.downgrade, "0011")
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM archived_totals"))
        _alembic(engine, command.downgrade, "0011")
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(sa.text(row))
        _alembic(engine, command.upgrade, "head")
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        engine.dispose()
