"""candidates.extra as json (text) instead of jsonb

The ingest builds each row's extra columns as a JSON object in the loader (orjson) and
the lease copies them back into its JSON body; no statement looks inside them. As
``json`` the server only checks the text on the way in and passes it through on the way
out, where ``jsonb`` is parsed into its binary form at ingest and rendered again on every
lease: the server's COPY + INSERT of a million rows took 18.8 s with
``jsonb_build_object`` into ``jsonb`` and 16.3 s with the loader's text into ``json``.
``json`` also keeps the input's key order.

The upgrade rewrites ``candidates`` (every row's ``extra`` is converted) under an ACCESS
EXCLUSIVE lock: seconds per million candidates.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 14:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.alter_column('candidates', 'extra', type_=postgresql.JSON(),
                    existing_type=postgresql.JSONB(), postgresql_using='extra::json')


def downgrade() -> None:
    op.alter_column('candidates', 'extra', type_=postgresql.JSONB(),
                    existing_type=postgresql.JSON(), postgresql_using='extra::jsonb')
