"""One outbox for every effect on another service (audit entries, a turn's usage), and the name
of a running turn's budget hold (so whoever ends the turn gives it back).

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_audit_outbox_next_attempt", table_name="audit_outbox")
    op.rename_table("audit_outbox", "outbox")
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("kind", sa.String(32), nullable=False, server_default="audit"))
    op.create_index("ix_outbox_next_attempt", "outbox", ["next_attempt"])
    with op.batch_alter_table("turns") as batch:
        batch.add_column(
            sa.Column("budget_hold", sa.String(300), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("turns") as batch:
        batch.drop_column("budget_hold")
    op.drop_index("ix_outbox_next_attempt", table_name="outbox")
    op.execute("DELETE FROM outbox WHERE kind <> 'audit'")
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("kind")
    op.rename_table("outbox", "audit_outbox")
    op.create_index("ix_audit_outbox_next_attempt", "audit_outbox", ["next_attempt"])
