"""URL retries: candidates whose outcome was transient, sent back for a later batch

- ``url_retries``: one row per candidate that was sent back at least once: the attempt
  it is at (2 for its first retry), when it may be leased again (``not_before``) and the
  batch that holds it now (NULL while it waits). A lease draws waiting rows that are due
  (index ``url_retries_waiting`` on ``not_before``, only the waiting rows); the lease of
  a batch reads its candidates' attempts by ``batch_id``. The archive deletes a
  candidate's row with the candidate.
- ``batches.retried``: candidates the batch sent back (they left its ``batch_members``
  and its ``size``; its ``outcomes`` count only the others);
  ``archived_totals.retried``: the same for the archived batches.

New table and constant-default columns only: nothing is rewritten.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
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
    op.add_column('batches', sa.Column('retried', sa.Integer(), server_default='0',
                                       nullable=False))
    op.add_column('archived_totals', sa.Column('retried', sa.BigInteger(),
                                               server_default='0', nullable=False))


def downgrade() -> None:
    op.drop_column('archived_totals', 'retried')
    op.drop_column('batches', 'retried')
    op.drop_index('url_retries_batch_id_idx', table_name='url_retries')
    op.drop_index('url_retries_waiting', table_name='url_retries',
                  postgresql_where=sa.text('batch_id IS NULL'))
    op.drop_table('url_retries')
