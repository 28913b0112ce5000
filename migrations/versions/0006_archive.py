"""the archive: records of the parquet files finished batches move to, and their totals

``pairfarm archive`` (and the coordinator's automatic mode) moves finished batches
(``done``, ``failed``) with their ``batch_members`` and ``candidates`` rows out of the
database into parquet files (``coordinator.archive``). In the transaction that deletes
them it records the file (``archives``) and adds what the batches counted to the archived
totals, which the stats add to the hot tables' figures:

- ``archives``: one row per file (folder, name, batch id range, batches, candidates,
  bytes); a file without its row is garbage from a run that died before its commit;
- ``archived_totals``: batches, candidates, bytes downloaded, kept, dropped and the
  earliest creation time, per final status;
- ``archived_outcomes``: URLs by outcome class;
- ``archived_minutes``: candidates and ok samples per minute of download completion;
- ``archived_worker_downloads``: candidates per download worker;
- ``archived_similarity``: the post-processing similarity histograms, per edge set and
  bin.

New tables only: nothing is rewritten.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 01:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ('archived_similarity', 'archived_worker_downloads', 'archived_minutes',
          'archived_outcomes', 'archived_totals', 'archives')


def upgrade() -> None:
    op.create_table('archives',
    sa.Column('id', sa.Integer(), sa.Identity(always=False), nullable=False),
    sa.Column('directory', sa.Text(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('first_batch_id', sa.BigInteger(), nullable=False),
    sa.Column('last_batch_id', sa.BigInteger(), nullable=False),
    sa.Column('batches', sa.Integer(), nullable=False),
    sa.Column('candidates', sa.BigInteger(), nullable=False),
    sa.Column('file_bytes', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('archives_pkey')),
    sa.UniqueConstraint('directory', 'name', name=op.f('archives_directory_name_key')),
    )
    op.create_table('archived_totals',
    sa.Column('status', sa.Text(), nullable=False),
    sa.Column('batches', sa.BigInteger(), nullable=False),
    sa.Column('candidates', sa.BigInteger(), nullable=False),
    sa.Column('bytes_downloaded', sa.BigInteger(), nullable=False),
    sa.Column('kept', sa.BigInteger(), nullable=False),
    sa.Column('dropped', sa.BigInteger(), nullable=False),
    sa.Column('first_created_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('done', 'failed')", name=op.f('archived_totals_status_check')),
    sa.PrimaryKeyConstraint('status', name=op.f('archived_totals_pkey')),
    )
    op.create_table('archived_outcomes',
    sa.Column('outcome', sa.Text(), nullable=False),
    sa.Column('total', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('outcome', name=op.f('archived_outcomes_pkey')),
    )
    op.create_table('archived_minutes',
    sa.Column('minute', sa.DateTime(timezone=True), nullable=False),
    sa.Column('candidates', sa.BigInteger(), nullable=False),
    sa.Column('ok', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('minute', name=op.f('archived_minutes_pkey')),
    )
    op.create_table('archived_worker_downloads',
    sa.Column('worker_id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('candidates', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('worker_id', name=op.f('archived_worker_downloads_pkey')),
    )
    op.create_table('archived_similarity',
    sa.Column('edges', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('bin', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('samples', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('edges', 'bin', name=op.f('archived_similarity_pkey')),
    )


def downgrade() -> None:
    for table in TABLES:
        op.drop_table(table)
