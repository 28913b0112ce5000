"""url_waves: the dedup in waves, so that an insert descends the current wave's key only

``url_waves`` has one row per wave of URL hashes: the current one (``frozen_at`` NULL;
its hashes are ``url_hashes``) and the frozen ones (table ``url_hashes_w<wave>``, with
``bloom``: a split-block Bloom filter of its hashes). See ``coordinator.ingest.waves``.

The existing ``url_hashes`` becomes wave 0, current, with its row count (one scan of the
table). Downgrade puts every frozen wave's hashes back into ``url_hashes``.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('url_waves',
    sa.Column('wave', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('hashes', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('frozen_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('bloom', sa.LargeBinary(), nullable=True),
    sa.CheckConstraint('(frozen_at IS NULL) = (bloom IS NULL)',
                       name=op.f('url_waves_frozen_with_bloom_check')),
    sa.PrimaryKeyConstraint('wave', name=op.f('url_waves_pkey')),
    )
    op.execute("ALTER TABLE url_waves ALTER COLUMN bloom SET STORAGE EXTERNAL")
    op.execute("INSERT INTO url_waves (wave, hashes) SELECT 0, count(*) FROM url_hashes")


def downgrade() -> None:
    bind = op.get_bind()
    frozen = [w for (w,) in bind.execute(sa.text(
        "SELECT wave FROM url_waves WHERE frozen_at IS NOT NULL ORDER BY wave"))]
    for wave in frozen:
        op.execute(f"INSERT INTO url_hashes (h) SELECT h FROM url_hashes_w{int(wave)} "
                   "ON CONFLICT DO NOTHING")
        op.execute(f"DROP TABLE url_hashes_w{int(wave)}")
    op.drop_table('url_waves')
