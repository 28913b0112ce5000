"""url_hashes: exact URL dedup by a 128-bit hash instead of a unique index on the text

``url_hashes (h uuid PRIMARY KEY)`` holds one row per URL ever ingested: ``h`` is the
first 16 bytes of the SHA-256 of the cleaned URL's UTF-8 bytes (``coordinator.ingest.
urlhash``; in SQL ``encode(substr(sha256(convert_to(url, 'UTF8')), 1, 16), 'hex')::uuid``).
The ingest inserts a chunk's hashes with ``ON CONFLICT DO NOTHING`` and loads only the
rows whose hash went in: the first URL ingested wins, later ones count as duplicates.
The table is never archived, so the dedup also holds against candidates whose rows have
left ``candidates``.

Fixed width: ~16 bytes of key per URL (a heap tuple and a btree entry, ~70-90 bytes on
disk a URL with their headers) where the unique index on ``candidates.url`` held the
whole text (~100 bytes of index a URL for LAION-like URLs, and growing with the URL).

Collisions: with n URLs the chance that two distinct ones share a hash is about
n^2 / 2^129, ~5e-20 at 5.85 billion. If it happens, the later URL counts as a duplicate
and is not ingested.

The upgrade hashes the URLs of the existing candidates in SQL (PostgreSQL's ``sha256``)
and drops ``candidates_url_key``: about a second per million candidates, under an ACCESS
EXCLUSIVE lock on ``candidates`` for the drop. The downgrade rebuilds the unique index.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('url_hashes',
    sa.Column('h', postgresql.UUID(as_uuid=True), nullable=False),
    sa.PrimaryKeyConstraint('h', name=op.f('url_hashes_pkey')),
    )
    op.execute("INSERT INTO url_hashes (h) "
               "SELECT encode(substr(sha256(convert_to(url, 'UTF8')), 1, 16), 'hex')::uuid "
               "FROM candidates ON CONFLICT DO NOTHING")
    op.drop_index('candidates_url_key', table_name='candidates')


def downgrade() -> None:
    op.create_index('candidates_url_key', 'candidates', ['url'], unique=True)
    op.drop_table('url_hashes')
