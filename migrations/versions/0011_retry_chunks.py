"""Retry chunks: candidates sent back for a URL retry wait as arrays, not as rows

- ``retry_chunks``: one row per (completion, attempt) group of up to 1,000 candidates
  sent back: their ids (in id order), the attempt they are at and when they are due
  (``not_before``, index ``retry_chunks_due``). A lease takes whole due rows (``SKIP
  LOCKED``) and deletes them; the row that crosses the batch size is split (its rest goes
  back as a new row with the same attempt and ``not_before``). 500 candidates sent back
  cost one row and one index entry instead of 500 (``url_retries``), and a lease taking
  them locks and deletes a few rows instead of updating 500.
- ``batch_members.attempts``: each member's attempt, element for element with ``ids``;
  NULL when every member is at its first attempt (most batches).
- ``url_retries`` is dropped: its waiting rows become retry chunks (grouped by attempt,
  up to 1,000 in ``not_before`` order, due at the latest of theirs), the attempts of the
  rows a batch holds go to that batch's ``attempts``. Downgrade does the reverse (a
  waiting candidate keeps its chunk's ``not_before``).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: the most ids a retry chunk holds when a completion writes it (8 kB of ids: inline)
CHUNK_IDS = 1000


def upgrade() -> None:
    op.create_table('retry_chunks',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('not_before', sa.DateTime(timezone=True), nullable=False),
    sa.Column('attempt', sa.SmallInteger(), nullable=False),
    sa.Column('ids', sa.ARRAY(sa.BigInteger()), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('retry_chunks_pkey')),
    )
    op.create_index('retry_chunks_due', 'retry_chunks', ['not_before'], unique=False)
    op.execute('ALTER TABLE retry_chunks ALTER COLUMN ids SET STORAGE EXTERNAL')
    op.execute('ALTER TABLE retry_chunks SET (toast_tuple_target = 8160)')
    op.add_column('batch_members', sa.Column('attempts', sa.ARRAY(sa.SmallInteger()),
                                             nullable=True))
    op.execute(
        "UPDATE batch_members b SET attempts = ARRAY("
        " SELECT COALESCE(r.attempt, 1) FROM unnest(b.ids) WITH ORDINALITY AS u(id, k)"
        " LEFT JOIN url_retries r ON r.id = u.id AND r.batch_id = b.batch_id ORDER BY u.k)"
        " WHERE b.batch_id IN (SELECT batch_id FROM url_retries WHERE batch_id IS NOT NULL)")
    op.execute(
        "INSERT INTO retry_chunks (not_before, attempt, ids)"
        " SELECT max(not_before), attempt, array_agg(id ORDER BY id)"
        "   FROM (SELECT id, attempt, not_before,"
        "                (row_number() OVER (PARTITION BY attempt ORDER BY not_before, id)"
        f"                 - 1) / {CHUNK_IDS} AS g"
        "           FROM url_retries WHERE batch_id IS NULL) AS w"
        "  GROUP BY attempt, g ORDER BY min(not_before)")
    op.drop_index('url_retries_batch_id_idx', table_name='url_retries')
    op.drop_index('url_retries_waiting', table_name='url_retries',
                  postgresql_where=sa.text('batch_id IS NULL'))
    op.drop_table('url_retries')


def downgrade() -> None:
    op.create_table('url_retries',
    sa.Column('id', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('attempt', sa.SmallInteger(), nullable=False),
    sa.Column('not_before', sa.DateTime(timezone=True), nullable=False),
    sa.Column('batch_id', sa.BigInteger(), nullable=True),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'],
                            name=op.f('url_retries_batch_id_fkey')),
    sa.PrimaryKeyConstraint('id', name=op.f('url_retries_pkey')),
    )
    op.create_index('url_retries_waiting', 'url_retries', ['not_before'], unique=False,
                    postgresql_where=sa.text('batch_id IS NULL'))
    op.create_index('url_retries_batch_id_idx', 'url_retries', ['batch_id'], unique=False)
    op.execute("INSERT INTO url_retries (id, attempt, not_before, batch_id)"
               " SELECT u.id, r.attempt, r.not_before, NULL"
               "   FROM retry_chunks r, unnest(r.ids) AS u(id)")
    op.execute("INSERT INTO url_retries (id, attempt, not_before, batch_id)"
               " SELECT u.id, u.attempt, now(), b.batch_id"
               "   FROM batch_members b, unnest(b.ids, b.attempts) AS u(id, attempt)"
               "  WHERE b.attempts IS NOT NULL AND u.attempt > 1")
    op.drop_column('batch_members', 'attempts')
    op.drop_index('retry_chunks_due', table_name='retry_chunks')
    op.drop_table('retry_chunks')
