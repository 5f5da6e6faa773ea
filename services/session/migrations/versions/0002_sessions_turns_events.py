"""Sessions, turns, the event log and pending permission requests.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

USAGE = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "cost_usd_micros",
)


def _usage() -> list[sa.Column]:
    return [sa.Column(n, sa.BigInteger, nullable=False, server_default="0") for n in USAGE]


def _session_fk() -> sa.Column:
    return sa.Column(
        "session_id",
        sa.String(64),
        sa.ForeignKey("sessions.id", ondelete="CASCADE"),
        primary_key=True,
    )


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("organization", sa.String(200), nullable=False),
        sa.Column("owner", sa.String(300), nullable=False),
        sa.Column("display_name", sa.String(200), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("agent_options", sa.LargeBinary, nullable=False),
        sa.Column("labels", sa.Text, nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("archive_time", sa.DateTime(timezone=True)),
        sa.Column("last_sequence", sa.BigInteger, nullable=False),
        *_usage(),
        sa.Column("turn_count", sa.Integer, nullable=False),
        sa.Column("current_turn", sa.String(64), nullable=False),
        sa.Column("workspace", sa.String(200), nullable=False),
        sa.Column("transcript_id", sa.String(200), nullable=False),
        sa.Column("parent_session", sa.String(200), nullable=False),
        sa.Column("fork_sequence", sa.BigInteger, nullable=False),
        sa.Column("failure_reason", sa.String(100), nullable=False),
        sa.Column("failure_message", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("request_id", sa.String(100), nullable=False),
    )
    op.create_index("ix_sessions_org_create", "sessions", ["organization", "create_time"])
    op.create_index("ix_sessions_owner_request", "sessions", ["owner", "request_id"])
    op.create_table(
        "turns",
        _session_fk(),
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("ordinal", sa.Integer, nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("sender", sa.String(300), nullable=False),
        sa.Column("request_id", sa.String(100), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("start_time", sa.DateTime(timezone=True)),
        sa.Column("end_time", sa.DateTime(timezone=True)),
        sa.Column("first_sequence", sa.BigInteger, nullable=False),
        sa.Column("last_sequence", sa.BigInteger, nullable=False),
        *_usage(),
        sa.Column("result", sa.LargeBinary, nullable=False),
        sa.Column("reservation", sa.String(300), nullable=False),
    )
    op.create_index("ix_turns_session_ordinal", "turns", ["session_id", "ordinal"], unique=True)
    op.create_index("ix_turns_session_state", "turns", ["session_id", "state"])
    op.create_table(
        "session_events",
        _session_fk(),
        sa.Column("sequence", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("turn_id", sa.String(64), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "permission_requests",
        _session_fk(),
        sa.Column("id", sa.String(100), primary_key=True),
        sa.Column("turn_id", sa.String(64), nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("pending", sa.Boolean, nullable=False),
    )


def downgrade() -> None:
    for table in ("permission_requests", "session_events", "turns", "sessions"):
        op.drop_table(table)
