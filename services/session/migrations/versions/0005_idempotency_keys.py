"""Idempotency by request_id through the shared kit: session's own idempotency_keys table
(keys scoped per method and caller, kept 24 hours). The request_id columns of sessions and
turns, which served the old per-table lookups, go.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "idempotency_keys",
        sa.Column("scope", sa.String(200), primary_key=True),
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("result", sa.String(300), nullable=False),
        sa.Column("create_time", sa.Float, nullable=False),
    )
    op.create_index("ix_idempotency_keys_create_time", "idempotency_keys", ["create_time"])
    op.drop_index("ix_sessions_owner_request", table_name="sessions")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("request_id")
    with op.batch_alter_table("turns") as batch:
        batch.drop_column("request_id")


def downgrade() -> None:
    with op.batch_alter_table("turns") as batch:
        batch.add_column(sa.Column("request_id", sa.String(100), nullable=False, server_default=""))
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("request_id", sa.String(100), nullable=False, server_default=""))
    op.create_index("ix_sessions_owner_request", "sessions", ["owner", "request_id"])
    op.drop_index("ix_idempotency_keys_create_time", table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
