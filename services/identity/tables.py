"""Identity's tables (SQLAlchemy Core, one ``metadata``): the schema its migrations build.

Times are epoch seconds (double precision) so SQLite and PostgreSQL behave alike.
"""

from __future__ import annotations

import sqlalchemy as sa

from corral.libs.idempotency import idempotency_table
from corral.services.identity.domain import LIMIT_FIELDS

metadata = sa.MetaData()
Time = sa.Double
SerialId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

organizations = sa.Table(
    "organizations",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("display_name", sa.String(200), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("create_time", Time, nullable=False),
    sa.Column("update_time", Time, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
)

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("organization_id", sa.String(64), sa.ForeignKey("organizations.id"), nullable=False),
    sa.Column("email", sa.String(320), nullable=False, unique=True),
    sa.Column("display_name", sa.String(200), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("superuser", sa.Boolean, nullable=False),
    sa.Column("password_hash", sa.Text, nullable=False),
    sa.Column("token_generation", sa.Integer, nullable=False),
    sa.Column("create_time", Time, nullable=False),
    sa.Column("update_time", Time, nullable=False),
    sa.Column("last_login_time", Time),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Index("users_by_org", "organization_id", "create_time"),
)

service_accounts = sa.Table(
    "service_accounts",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("organization_id", sa.String(64), sa.ForeignKey("organizations.id"), nullable=False),
    sa.Column("display_name", sa.String(200), nullable=False),
    sa.Column("description", sa.String(1000), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("internal", sa.Boolean, nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False),
    sa.Column("token_generation", sa.Integer, nullable=False),
    sa.Column("create_time", Time, nullable=False),
    sa.Column("update_time", Time, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Index("service_accounts_by_org", "organization_id", "create_time"),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("organization_id", sa.String(64), nullable=False),
    sa.Column(
        "service_account_id", sa.String(64), sa.ForeignKey("service_accounts.id"), nullable=False
    ),
    sa.Column("display_name", sa.String(200), nullable=False),
    sa.Column("lookup", sa.String(16), nullable=False, unique=True),
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("expire_time", Time),
    sa.Column("create_time", Time, nullable=False),
    sa.Column("last_use_time", Time),
    sa.Column("revoke_time", Time),
    sa.Index("api_keys_by_account", "service_account_id", "create_time"),
)

refresh_families = sa.Table(
    "refresh_families",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.String(64), nullable=False, index=True),
    sa.Column("organization_id", sa.String(64), nullable=False),
    sa.Column("create_time", Time, nullable=False),
    sa.Column("revoke_time", Time),
)

refresh_tokens = sa.Table(
    "refresh_tokens",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("family_id", sa.String(64), sa.ForeignKey("refresh_families.id"), nullable=False),
    sa.Column("user_id", sa.String(64), nullable=False),
    sa.Column("organization_id", sa.String(64), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("create_time", Time, nullable=False),
    sa.Column("expire_time", Time, nullable=False),
    sa.Column("used_time", Time),
)

signing_keys = sa.Table(
    "signing_keys",
    metadata,
    sa.Column("kid", sa.String(64), primary_key=True),
    sa.Column("algorithm", sa.String(16), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("private_key", sa.LargeBinary, nullable=False),
    sa.Column("public_jwk", sa.Text, nullable=False),
    sa.Column("create_time", Time, nullable=False),
    sa.Column("activate_time", Time),
    sa.Column("retire_time", Time),
    sa.Column("unpublish_time", Time),
    # At most one key signs and one waits: racing replicas cannot both create or promote one.
    *(
        sa.Index(
            f"one_{state}_signing_key",
            "state",
            unique=True,
            sqlite_where=sa.text(f"state = '{state}'"),
            postgresql_where=sa.text(f"state = '{state}'"),
        )
        for state in ("active", "pending")
    ),
)

# Idempotent creates (request_id): the shared shape of corral.libs.idempotency.
idempotency_keys = idempotency_table(metadata)

quotas = sa.Table(
    "quotas",
    metadata,
    sa.Column("subject", sa.String(200), primary_key=True),
    sa.Column("organization_id", sa.String(64), nullable=False),
    *(sa.Column(name, sa.BigInteger) for name in LIMIT_FIELDS),
    sa.Column("update_time", Time, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
)

usage_counters = sa.Table(
    "usage_counters",
    metadata,
    sa.Column("subject", sa.String(200), primary_key=True),
    sa.Column("kind", sa.String(32), primary_key=True),
    sa.Column("period", sa.String(8), primary_key=True),
    sa.Column("used", sa.BigInteger, nullable=False),
    sa.Column("reserved", sa.BigInteger, nullable=False),
)

reservations = sa.Table(
    "reservations",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("organization_id", sa.String(64), nullable=False),
    sa.Column("subject", sa.String(200), nullable=False),
    sa.Column("amounts", sa.Text, nullable=False),
    sa.Column("settled_amounts", sa.Text, nullable=False),
    sa.Column("reference", sa.String(300), nullable=False),
    sa.Column("request_id", sa.String(64), nullable=False, unique=True),
    sa.Column("period", sa.String(8), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("create_time", Time, nullable=False),
    sa.Column("expire_time", Time, nullable=False),
    sa.Column("settle_time", Time),
    sa.Column("end_time", Time),
    sa.Index("reservations_open", "state", "expire_time"),
)

usage_entries = sa.Table(
    "usage_entries",
    metadata,
    sa.Column("id", SerialId, primary_key=True, autoincrement=True),
    sa.Column("organization_id", sa.String(64), nullable=False),
    sa.Column("principal", sa.String(200), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("time", Time, nullable=False),
    sa.Index("usage_entries_by_org", "organization_id", "time"),
)

audit_events = sa.Table(
    "audit_events",
    metadata,
    sa.Column("seq", SerialId, primary_key=True, autoincrement=True),
    sa.Column("organization_id", sa.String(64), nullable=False),
    sa.Column("event_time", Time, nullable=False),
    sa.Column("actor", sa.String(300), nullable=False),
    sa.Column("action", sa.String(200), nullable=False),
    sa.Column("resource", sa.String(300), nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("status_code", sa.Integer, nullable=False),
    sa.Column("source_ip", sa.String(64), nullable=False),
    sa.Column("user_agent", sa.String(256), nullable=False),
    sa.Column("request_id", sa.String(128), nullable=False),
    sa.Column("service", sa.String(32), nullable=False),
    sa.Column("metadata", sa.Text, nullable=False),
    sa.Column("create_time", Time, nullable=False),
    sa.Index("audit_events_by_org", "organization_id", "event_time"),
)

login_failures = sa.Table(
    "login_failures",
    metadata,
    sa.Column("id", SerialId, primary_key=True, autoincrement=True),
    sa.Column("scope", sa.String(8), nullable=False),
    sa.Column("key", sa.String(320), nullable=False),
    sa.Column("time", Time, nullable=False),
    sa.Index("login_failures_by_key", "scope", "key", "time"),
)

audit_batches = sa.Table(
    "audit_batches",
    metadata,
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("written", sa.Integer, nullable=False),
    sa.Column("create_time", Time, nullable=False),
)
