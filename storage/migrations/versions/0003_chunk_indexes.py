"""Chunk indexes: the stored routing summaries of each corpus layout version.

Revision ID: 0003
Revises: 0002
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: Union[str, Sequence[str], None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "chunk_indexes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("corpus_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(length=512), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("format_version", sa.Integer(), nullable=False),
        sa.Column("chunk_size", sa.Integer(), nullable=False),
        sa.Column("num_chunks", sa.Integer(), nullable=False),
        sa.Column("num_tokens", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["corpus_id"], ["corpora.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("corpus_id", "version"),
    )
    with op.batch_alter_table("chunk_indexes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_chunk_indexes_corpus_id"), ["corpus_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("chunk_indexes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_chunk_indexes_corpus_id"))
    op.drop_table("chunk_indexes")
