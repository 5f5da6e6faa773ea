"""Idempotency by request_id through the shared kit: identity's idempotency_keys table takes the
shared shape (keys scoped per method and caller, the created resource's name as the result,
kept 24 hours). Nothing is released yet, so the old table's rows are dropped with it.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_table("idempotency_keys")
    op.create_table(
        "idempotency_keys",
        sa.Column("scope", sa.String(200), primary_key=True),
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("result", sa.String(300), nullable=False),
        sa.Column("create_time", sa.Float, nullable=False),
    )
    op.create_index("ix_idempotency_keys_create_time", "idempotency_keys", ["create_time"])


def downgrade() -> None:
    op.drop_index("ix_idempotency_keys_create_time", table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
    op.create_table(
        "idempotency_keys",
        sa.Column("scope", sa.String(length=64), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("resource", sa.String(length=300), nullable=False),
        sa.Column("create_time", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("scope", "request_id"),
    )
