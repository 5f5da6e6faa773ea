"""The storage context's tables (its own schema; no other service reads them)."""

from __future__ import annotations

import sqlalchemy as sa

from corral.libs.idempotency import idempotency_table
from corral.libs.outbox import outbox_table

metadata = sa.MetaData()


def _time(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


workspaces = sa.Table(
    "workspaces",
    metadata,
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
    sa.Index("ix_workspaces_org_create", "organization", "create_time"),
    sa.Index("ix_workspaces_expire", "expire_time"),
)

# The settled ledger reservations that hold a workspace's bytes on its owner's quota.
workspace_holds = sa.Table(
    "workspace_holds",
    metadata,
    sa.Column("workspace_id", sa.String(64), primary_key=True),
    sa.Column("reservation", sa.String(300), primary_key=True),
    sa.Column("bytes", sa.BigInteger, nullable=False),
)

uploads = sa.Table(
    "uploads",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("workspace_id", sa.String(64), nullable=False, index=True),
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
    sa.Column("parts", sa.Text, nullable=False),  # JSON [[number, size, etag], ...]
    sa.Column("pending", sa.Text, nullable=False),  # JSON [[key, size], ...]
    sa.Column("holds", sa.Text, nullable=False),  # JSON [reservation, ...]
    sa.Column("held_bytes", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("failure_reason", sa.String(64), nullable=False),
    _time("busy_until", nullable=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Index("ix_uploads_state_expire", "state", "expire_time"),
)

# What is known of a file's content while its (size, mtime, inode) stay the same.
file_digests = sa.Table(
    "file_digests",
    metadata,
    sa.Column("workspace_id", sa.String(64), primary_key=True),
    sa.Column("path", sa.Text, primary_key=True),
    sa.Column("fingerprint", sa.String(100), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("content_type", sa.String(200), nullable=False),
)

reports = sa.Table(
    "reports",
    metadata,
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
    sa.Index("ix_reports_org_create", "organization", "create_time"),
    sa.Index("ix_reports_expire", "expire_time"),
)

archives = sa.Table(
    "archives",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("workspace_id", sa.String(64), nullable=False, index=True),
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
    sa.Index("ix_archives_expire", "expire_time"),
)

# Jobs that must run on one replica at a time (the retention sweeper): who holds each, until.
leases = sa.Table(
    "leases",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("holder", sa.String(64), nullable=False),
    _time("until"),
)

idempotency_keys = idempotency_table(metadata)
# Effects on identity that must happen (audit entries, ledger releases): the kit's outbox, on
# this context's own table.
outbox = outbox_table(metadata)
