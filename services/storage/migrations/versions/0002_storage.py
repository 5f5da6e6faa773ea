"""Workspaces, their quota holds and file digests, uploads, reports, archives, leases,
idempotency keys and the outbox (audit entries, ledger releases).

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _time(name: str, *, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "workspaces",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("organization", sa.String(200), nullable=False),
        sa.Column("session", sa.String(200), nullable=False),
        sa.Column("owner", sa.String(300), nullable=False),
        sa.Column("labels", sa.Text, nullable=False),
        sa.Column("source_workspace", sa.String(200), nullable=False),
        _time("create_time"),
        _time("update_time"),
        _time("expire_time", nullable=True),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("file_count", sa.BigInteger, nullable=False),
        _time("measure_time", nullable=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("accounting_version", sa.Integer, nullable=False),
    )
    op.create_index("ix_workspaces_org_create", "workspaces", ["organization", "create_time"])
    op.create_index("ix_workspaces_expire", "workspaces", ["expire_time"])
    op.create_table(
        "workspace_holds",
        sa.Column("workspace_id", sa.String(64), primary_key=True),
        sa.Column("reservation", sa.String(300), primary_key=True),
        sa.Column("bytes", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "uploads",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("workspace_id", sa.String(64), nullable=False),
        sa.Column("organization", sa.String(200), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("declared_size", sa.BigInteger, nullable=False),
        sa.Column("content_type", sa.String(200), nullable=False),
        sa.Column("overwrite", sa.Boolean, nullable=False),
        sa.Column("creator", sa.String(300), nullable=False),
        sa.Column("charged_to", sa.String(300), nullable=False),
        _time("create_time"),
        _time("update_time"),
        _time("expire_time"),
        sa.Column("blob_key", sa.String(300), nullable=False),
        sa.Column("multipart_id", sa.String(300), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("committed_bytes", sa.BigInteger, nullable=False),
        sa.Column("parts", sa.Text, nullable=False),
        sa.Column("pending", sa.Text, nullable=False),
        sa.Column("holds", sa.Text, nullable=False),
        sa.Column("held_bytes", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("failure_reason", sa.String(64), nullable=False),
        _time("busy_until", nullable=True),
        sa.Column("version", sa.Integer, nullable=False),
    )
    op.create_index("ix_uploads_workspace_id", "uploads", ["workspace_id"])
    op.create_index("ix_uploads_state_expire", "uploads", ["state", "expire_time"])
    op.create_table(
        "file_digests",
        sa.Column("workspace_id", sa.String(64), primary_key=True),
        sa.Column("path", sa.Text, primary_key=True),
        sa.Column("fingerprint", sa.String(100), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("content_type", sa.String(200), nullable=False),
    )
    op.create_table(
        "reports",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("organization", sa.String(200), nullable=False),
        sa.Column("owner", sa.String(300), nullable=False),
        sa.Column("creator", sa.String(300), nullable=False),
        sa.Column("title", sa.String(500), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("content_type", sa.String(200), nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("labels", sa.Text, nullable=False),
        _time("create_time"),
        sa.Column("blob_key", sa.String(300), nullable=False),
        sa.Column("session", sa.String(200), nullable=False),
        sa.Column("task_run", sa.String(200), nullable=False),
        _time("expire_time", nullable=True),
        sa.Column("hold", sa.String(300), nullable=False),
    )
    op.create_index("ix_reports_org_create", "reports", ["organization", "create_time"])
    op.create_index("ix_reports_expire", "reports", ["expire_time"])
    op.create_table(
        "archives",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("workspace_id", sa.String(64), nullable=False),
        sa.Column("organization", sa.String(200), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("path_prefix", sa.Text, nullable=False),
        sa.Column("creator", sa.String(300), nullable=False),
        _time("create_time"),
        _time("expire_time"),
        sa.Column("blob_key", sa.String(300), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("file_count", sa.BigInteger, nullable=False),
        _time("end_time", nullable=True),
        sa.Column("failure_reason", sa.String(64), nullable=False),
        sa.Column("hold", sa.String(300), nullable=False),
    )
    op.create_index("ix_archives_workspace_id", "archives", ["workspace_id"])
    op.create_index("ix_archives_expire", "archives", ["expire_time"])
    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(64), nullable=False),
        _time("until"),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("scope", sa.String(200), primary_key=True),
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("result", sa.String(300), nullable=False),
        sa.Column("create_time", sa.Float, nullable=False),
    )
    op.create_index("ix_idempotency_keys_create_time", "idempotency_keys", ["create_time"])
    op.create_table(
        "outbox",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("organization", sa.String(200), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt", sa.DateTime(timezone=True), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.String(500), nullable=False),
    )
    op.create_index("ix_outbox_next_attempt", "outbox", ["next_attempt"])


def downgrade() -> None:
    for table in (
        "outbox",
        "idempotency_keys",
        "leases",
        "archives",
        "reports",
        "file_digests",
        "uploads",
        "workspace_holds",
        "workspaces",
    ):
        op.drop_table(table)
