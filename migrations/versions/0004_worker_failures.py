"""who held a batch last, and the workers' runs of failures (quarantine)

- ``batches.last_worker_id``: the client that held the batch's last lease, kept when the
  lease ends by a failure, a release or the reaper (``worker_id`` is cleared then), so
  that ``pairfarm batches requeue --worker`` can find the batches a worker failed.
- ``workers.failures_in_row`` / ``failing_since``: failures a client reported with no
  completion in between, and when the run began; ``quarantined_until`` /
  ``quarantine_reason``: a client whose run of failures reached the limit gets no lease
  until then (``--quarantine-after``).

Only columns with no default or a constant one are added: no table is rewritten.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('batches', sa.Column('last_worker_id', sa.Integer(), nullable=True))
    op.create_foreign_key('batches_last_worker_id_fkey', 'batches', 'workers',
                          ['last_worker_id'], ['id'])
    op.add_column('workers', sa.Column('failures_in_row', sa.SmallInteger(),
                                       server_default='0', nullable=False))
    op.add_column('workers', sa.Column('failing_since', sa.DateTime(timezone=True),
                                       nullable=True))
    op.add_column('workers', sa.Column('quarantined_until', sa.DateTime(timezone=True),
                                       nullable=True))
    op.add_column('workers', sa.Column('quarantine_reason', sa.Text(), nullable=True))


def downgrade() -> None:
    for column in ('quarantine_reason', 'quarantined_until', 'failing_since',
                   'failures_in_row'):
        op.drop_column('workers', column)
    op.drop_constraint('batches_last_worker_id_fkey', 'batches', type_='foreignkey')
    op.drop_column('batches', 'last_worker_id')
