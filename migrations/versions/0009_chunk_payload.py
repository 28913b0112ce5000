"""Pending chunks that carry their candidates' lease payload

``pending_chunks`` gets four nullable text columns, ``url_j``, ``caption_j``,
``language_j`` and ``extra_j``: the chunk's candidates' fields as JSON array fragments
(the elements without the brackets, in the order of ``ids``), written by the ingest. A
lease that takes the chunk concatenates them into its body instead of reading the
chunk's ``candidates`` rows. NULL: the chunk carries none (chunks written before this
revision, or by any other writer); the lease reads those candidates' rows, as before.

The fragments are stored uncompressed and inline up to 8,160 bytes a row
(``toast_tuple_target``, ``STORAGE EXTERNAL``): pglz at ingest would cost more CPU than
the lease saves, and a 16-candidate chunk of LAION-like rows is 4-6 kB.

Nullable columns without a default: nothing is rewritten.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ('url_j', 'caption_j', 'language_j', 'extra_j')


def upgrade() -> None:
    for name in COLUMNS:
        op.add_column('pending_chunks', sa.Column(name, sa.Text(), nullable=True))
        op.execute(f'ALTER TABLE pending_chunks ALTER COLUMN {name} SET STORAGE EXTERNAL')
    op.execute('ALTER TABLE pending_chunks SET (toast_tuple_target = 8160)')


def downgrade() -> None:
    op.execute('ALTER TABLE pending_chunks RESET (toast_tuple_target)')
    for name in reversed(COLUMNS):
        op.drop_column('pending_chunks', name)
