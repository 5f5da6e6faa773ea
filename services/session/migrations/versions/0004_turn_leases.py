"""Turn leases: which session-service process runs a turn, renewed while it lives.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("turns") as batch:
        batch.add_column(sa.Column("driver", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("lease_time", sa.DateTime(timezone=True)))


def downgrade() -> None:
    with op.batch_alter_table("turns") as batch:
        batch.drop_column("lease_time")
        batch.drop_column("driver")
