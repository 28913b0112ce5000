"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-22 08:10:16.488369
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('candidates',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('url', sa.Text(), nullable=False),
    sa.Column('caption', sa.Text(), nullable=False),
    sa.Column('language', sa.Text(), nullable=True),
    sa.Column('ingest_id', sa.Integer(), nullable=True),
    sa.Column('extra', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('batch_id', sa.BigInteger(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('candidates_pkey'))
    )
    op.create_index('candidates_batch_id_idx', 'candidates', ['batch_id'], unique=False, postgresql_where=sa.text('batch_id IS NOT NULL'))
    op.create_index('candidates_unbatched', 'candidates', ['id'], unique=False, postgresql_where=sa.text('batch_id IS NULL'))
    op.create_index('candidates_url_key', 'candidates', ['url'], unique=True)
    op.create_table('ingests',
    sa.Column('id', sa.Integer(), sa.Identity(always=False), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('rows_read', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('inserted', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('duplicates', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('rejected', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('ingests_pkey'))
    )
    op.create_table('tokens',
    sa.Column('id', sa.Integer(), sa.Identity(always=False), nullable=False),
    sa.Column('role', sa.Text(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('token_sha256', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("role IN ('worker', 'gpu', 'admin')", name=op.f('tokens_role_check')),
    sa.PrimaryKeyConstraint('id', name=op.f('tokens_pkey')),
    sa.UniqueConstraint('token_sha256', name=op.f('tokens_token_sha256_key'))
    )
    op.create_table('workers',
    sa.Column('id', sa.Integer(), sa.Identity(always=False), nullable=False),
    sa.Column('token_id', sa.Integer(), nullable=False),
    sa.Column('role', sa.Text(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('version', sa.Text(), nullable=True),
    sa.Column('registered_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['token_id'], ['tokens.id'], name=op.f('workers_token_id_fkey')),
    sa.PrimaryKeyConstraint('id', name=op.f('workers_pkey')),
    sa.UniqueConstraint('token_id', name=op.f('workers_token_id_key'))
    )
    op.create_table('batches',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('status', sa.Text(), nullable=False),
    sa.Column('size', sa.Integer(), server_default='0', nullable=False),
    sa.Column('worker_id', sa.Integer(), nullable=True),
    sa.Column('lease_token', sa.Text(), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('attempts', sa.SmallInteger(), server_default='0', nullable=False),
    sa.Column('pp_attempts', sa.SmallInteger(), server_default='0', nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('downloaded_by', sa.Integer(), nullable=True),
    sa.Column('shard', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('tar_sha256', sa.Text(), nullable=True),
    sa.Column('outcomes', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('bytes_downloaded', sa.BigInteger(), nullable=True),
    sa.Column('download_s', sa.Float(), nullable=True),
    sa.Column('download_digest', sa.Text(), nullable=True),
    sa.Column('postprocess', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('kept', sa.Integer(), nullable=True),
    sa.Column('dropped', sa.Integer(), nullable=True),
    sa.Column('postprocess_digest', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('leased_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('downloaded_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('done_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("(status IN ('leased', 'postprocessing')) = (lease_token IS NOT NULL)", name=op.f('batches_lease_token_check')),
    sa.CheckConstraint("status IN ('pending', 'leased', 'downloaded', 'postprocessing', 'done', 'failed')", name=op.f('batches_status_check')),
    sa.ForeignKeyConstraint(['downloaded_by'], ['workers.id'], name=op.f('batches_downloaded_by_fkey')),
    sa.ForeignKeyConstraint(['worker_id'], ['workers.id'], name=op.f('batches_worker_id_fkey')),
    sa.PrimaryKeyConstraint('id', name=op.f('batches_pkey'))
    )
    op.create_index('batches_downloaded', 'batches', ['id'], unique=False, postgresql_where=sa.text("status = 'downloaded'"))
    op.create_index('batches_leased_expiry', 'batches', ['lease_expires_at'], unique=False, postgresql_where=sa.text("status IN ('leased', 'postprocessing')"))
    op.create_index('batches_pending', 'batches', ['id'], unique=False, postgresql_where=sa.text("status = 'pending'"))
    op.create_index('batches_worker_id_idx', 'batches', ['worker_id'], unique=False)


def downgrade() -> None:
    op.drop_index('batches_worker_id_idx', table_name='batches')
    op.drop_index('batches_pending', table_name='batches', postgresql_where=sa.text("status = 'pending'"))
    op.drop_index('batches_leased_expiry', table_name='batches', postgresql_where=sa.text("status IN ('leased', 'postprocessing')"))
    op.drop_index('batches_downloaded', table_name='batches', postgresql_where=sa.text("status = 'downloaded'"))
    op.drop_table('batches')
    op.drop_table('workers')
    op.drop_table('tokens')
    op.drop_table('ingests')
    op.drop_index('candidates_url_key', table_name='candidates')
    op.drop_index('candidates_unbatched', table_name='candidates', postgresql_where=sa.text('batch_id IS NULL'))
    op.drop_index('candidates_batch_id_idx', table_name='candidates', postgresql_where=sa.text('batch_id IS NOT NULL'))
    op.drop_table('candidates')
