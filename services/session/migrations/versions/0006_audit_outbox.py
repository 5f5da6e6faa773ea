"""The audit outbox: audit events kept in the transaction of the change they record, retried
until identity has them.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_outbox",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("organization", sa.String(200), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt", sa.DateTime(timezone=True), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.String(500), nullable=False),
    )
    op.create_index("ix_audit_outbox_next_attempt", "audit_outbox", ["next_attempt"])


def downgrade() -> None:
    op.drop_index("ix_audit_outbox_next_attempt", table_name="audit_outbox")
    op.drop_table("audit_outbox")
