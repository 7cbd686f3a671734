"""Chat sessions carry an owner key: with sign-in off, anonymous chats belong to the browser
that made them (a hash of its random cookie), not to everyone who guesses a sequential id.

Revision ID: 0004
Revises: 0003
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: Union[str, Sequence[str], None] = "0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("chat_sessions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("owner_key", sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f("ix_chat_sessions_owner_key"), ["owner_key"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("chat_sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_chat_sessions_owner_key"))
        batch_op.drop_column("owner_key")
