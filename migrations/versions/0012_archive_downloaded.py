"""Archived totals may hold downloaded batches (farms without post-processing)

A farm that runs no post-processing leaves its batches ``downloaded``: that is their final
state. ``pairfarm archive --downloaded`` and the coordinator's ``--archive-downloaded``
archive them too, so ``archived_totals`` takes the status ``downloaded`` beside ``done``
and ``failed``. Downgrade refuses while such a row exists (the totals would be lost).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-08 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0012'
down_revision: str | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = 'archived_totals_status_check'


def upgrade() -> None:
    op.drop_constraint(op.f(NAME), 'archived_totals', type_='check')
    op.create_check_constraint(op.f(NAME), 'archived_totals',
                               "status IN ('done', 'failed', 'downloaded')")


def downgrade() -> None:
    held = op.get_bind().execute(sa.text(
        "SELECT count(*) FROM archived_totals WHERE status = 'downloaded'")).scalar_one()
    if held:
        raise RuntimeError("archived_totals holds downloaded batches; downgrading below 0012 "
                           "would lose their totals")
    op.drop_constraint(op.f(NAME), 'archived_totals', type_='check')
    op.create_check_constraint(op.f(NAME), 'archived_totals', "status IN ('done', 'failed')")
