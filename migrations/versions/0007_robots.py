"""robots.txt answers shared by the farm's download workers

``robots_txt`` holds, per origin (``scheme://host[:port]``), what a worker found when it
fetched that origin's robots.txt (``coordinator.robots``): the kind of answer (its rules,
allow all, disallow all), the HTTP status, the rule lines and when it expires. Workers
look an origin up before fetching its robots.txt themselves, so that each origin's file
is fetched about once per farm per TTL instead of once per worker. Rows past their
expiry are never served, and are deleted a few at a time as answers are stored.

A new table only: nothing is rewritten.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'robots_txt',
        sa.Column('origin', sa.Text(), nullable=False),
        sa.Column('kind', sa.Text(), nullable=False),
        sa.Column('status', sa.SmallInteger(), nullable=False),
        sa.Column('body', sa.Text(), nullable=False),
        sa.Column('fetched_at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
                  nullable=False),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("kind IN ('rules', 'allow_all', 'disallow_all')",
                           name=op.f('robots_txt_kind_check')),
        sa.PrimaryKeyConstraint('origin', name=op.f('robots_txt_pkey')),
    )
    op.create_index('robots_txt_expires_at_idx', 'robots_txt', ['expires_at'])


def downgrade() -> None:
    op.drop_index('robots_txt_expires_at_idx', table_name='robots_txt')
    op.drop_table('robots_txt')
