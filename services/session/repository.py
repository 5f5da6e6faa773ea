"""The session context's tables and repositories (SQLAlchemy Core: the event log is hot)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from corral.libs import keyset
from corral.libs.db import UnitOfWork
from corral.libs.idempotency import SqlIdempotencyStore, idempotency_table
from corral.libs.listing import Condition, Page
from corral.libs.outbox import OutboxRecords, outbox_table
from corral.services.session.domain import (
    AgentPolicyRecord,
    Session,
    SessionState,
    StoredEvent,
    Turn,
    TurnState,
    Usage,
)

metadata = sa.MetaData()

_usage_columns = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "cost_usd_micros",
)


def _usage(prefix: str = "") -> list[sa.Column[Any]]:
    return [
        sa.Column(f"{prefix}{name}", sa.BigInteger, nullable=False, server_default="0")
        for name in _usage_columns
    ]


sessions = sa.Table(
    "sessions",
    metadata,
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
    sa.Index("ix_sessions_org_create", "organization", "create_time"),
)

turns = sa.Table(
    "turns",
    metadata,
    sa.Column(
        "session_id",
        sa.String(64),
        sa.ForeignKey("sessions.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("ordinal", sa.Integer, nullable=False),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("sender", sa.String(300), nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("start_time", sa.DateTime(timezone=True)),
    sa.Column("end_time", sa.DateTime(timezone=True)),
    sa.Column("first_sequence", sa.BigInteger, nullable=False),
    sa.Column("last_sequence", sa.BigInteger, nullable=False),
    *_usage(),
    sa.Column("result", sa.LargeBinary, nullable=False),
    sa.Column("reservation", sa.String(300), nullable=False),
    sa.Column("driver", sa.String(64), nullable=False, server_default=""),
    sa.Column("lease_time", sa.DateTime(timezone=True)),
    sa.Column("budget_hold", sa.String(300), nullable=False, server_default=""),
    sa.Index("ix_turns_session_ordinal", "session_id", "ordinal", unique=True),
    sa.Index("ix_turns_session_state", "session_id", "state"),
)

session_events = sa.Table(
    "session_events",
    metadata,
    sa.Column(
        "session_id",
        sa.String(64),
        sa.ForeignKey("sessions.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("sequence", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("turn_id", sa.String(64), nullable=False),
    sa.Column("type", sa.String(32), nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
)

permission_requests = sa.Table(
    "permission_requests",
    metadata,
    sa.Column(
        "session_id",
        sa.String(64),
        sa.ForeignKey("sessions.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("id", sa.String(100), primary_key=True),
    sa.Column("turn_id", sa.String(64), nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),  # the serialised PermissionRequest
    sa.Column("pending", sa.Boolean, nullable=False),
)


agent_policies = sa.Table(
    "agent_policies",
    metadata,
    sa.Column("organization", sa.String(200), primary_key=True),
    # the serialised AgentPolicy, MCP secrets sealed (secrets.py)
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
)

idempotency_keys = idempotency_table(metadata)
outbox = outbox_table(metadata)


def _session_row(session: Session) -> dict[str, Any]:
    return {
        "id": session.id,
        "organization": session.organization,
        "owner": session.owner,
        "display_name": session.display_name,
        "state": session.state.value,
        "agent_options": session.agent_options,
        "labels": json.dumps(session.labels, sort_keys=True),
        "create_time": session.create_time,
        "update_time": session.update_time,
        "archive_time": session.archive_time,
        "last_sequence": session.last_sequence,
        **{name: getattr(session.usage, name) for name in _usage_columns},
        "turn_count": session.turn_count,
        "current_turn": session.current_turn,
        "workspace": session.workspace,
        "transcript_id": session.transcript_id,
        "parent_session": session.parent_session,
        "fork_sequence": session.fork_sequence,
        "failure_reason": session.failure_reason,
        "failure_message": session.failure_message,
        "version": session.version,
    }


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:  # SQLite returns naive datetimes
        return value.replace(tzinfo=UTC)
    return value


def _to_session(row: sa.Row[Any]) -> Session:
    m = row._mapping
    return Session(
        id=m["id"],
        organization=m["organization"],
        owner=m["owner"],
        display_name=m["display_name"],
        agent_options=bytes(m["agent_options"]),
        labels=json.loads(m["labels"]),
        create_time=_aware(m["create_time"]),  # type: ignore[arg-type]
        update_time=_aware(m["update_time"]),  # type: ignore[arg-type]
        workspace=m["workspace"],
        state=SessionState(m["state"]),
        archive_time=_aware(m["archive_time"]),
        last_sequence=m["last_sequence"],
        usage=Usage(**{name: m[name] for name in _usage_columns}),
        turn_count=m["turn_count"],
        current_turn=m["current_turn"],
        transcript_id=m["transcript_id"],
        parent_session=m["parent_session"],
        fork_sequence=m["fork_sequence"],
        failure_reason=m["failure_reason"],
        failure_message=m["failure_message"],
        version=m["version"],
    )


def _turn_row(turn: Turn) -> dict[str, Any]:
    return {
        "session_id": turn.session_id,
        "id": turn.id,
        "ordinal": turn.ordinal,
        "state": turn.state.value,
        "text": turn.text,
        "sender": turn.sender,
        "create_time": turn.create_time,
        "start_time": turn.start_time,
        "end_time": turn.end_time,
        "first_sequence": turn.first_sequence,
        "last_sequence": turn.last_sequence,
        **{name: getattr(turn.usage, name) for name in _usage_columns},
        "result": turn.result,
        "reservation": turn.reservation,
        "driver": turn.driver,
        "lease_time": turn.lease_time,
        "budget_hold": turn.budget_hold,
    }


def _to_turn(row: sa.Row[Any]) -> Turn:
    m = row._mapping
    return Turn(
        id=m["id"],
        session_id=m["session_id"],
        ordinal=m["ordinal"],
        text=m["text"],
        sender=m["sender"],
        create_time=_aware(m["create_time"]),  # type: ignore[arg-type]
        state=TurnState(m["state"]),
        start_time=_aware(m["start_time"]),
        end_time=_aware(m["end_time"]),
        first_sequence=m["first_sequence"],
        last_sequence=m["last_sequence"],
        usage=Usage(**{name: m[name] for name in _usage_columns}),
        result=bytes(m["result"]),
        reservation=m["reservation"],
        driver=m["driver"],
        lease_time=_aware(m["lease_time"]),
        budget_hold=m["budget_hold"],
    )


_LABELS = keyset.label_condition(sessions)


class SessionRepository:
    def __init__(self, connection: AsyncConnection) -> None:
        self._c = connection

    async def add(self, session: Session) -> None:
        await self._c.execute(sessions.insert().values(**_session_row(session)))

    async def get(self, session_id: str, *, for_update: bool = False) -> Session | None:
        query = sa.select(sessions).where(sessions.c.id == session_id)
        if for_update and self._c.dialect.name == "postgresql":
            query = query.with_for_update()
        row = (await self._c.execute(query)).first()
        return None if row is None else _to_session(row)

    async def save(self, session: Session) -> None:
        """Write back every field (last_sequence is owned by the event log and left alone)."""
        row = _session_row(session)
        row.pop("last_sequence")
        await self._c.execute(sessions.update().where(sessions.c.id == session.id).values(**row))

    async def delete(self, session_id: str) -> None:
        for table in (session_events, permission_requests, turns):
            await self._c.execute(table.delete().where(table.c.session_id == session_id))
        await self._c.execute(sessions.delete().where(sessions.c.id == session_id))

    async def list(
        self, conditions: Sequence[Condition], *, order: str, descending: bool, page: Page
    ) -> list[Session]:
        """One page (with one row to spare) in (``order``, id) order. Conditions name columns
        of ``sessions`` or ``labels.<key>``."""
        query = sa.select(sessions).where(*keyset.where(sessions, conditions, _LABELS))
        query = keyset.page_query(
            query, sessions.c[order], sessions.c.id, descending=descending, page=page
        )
        return [_to_session(row) for row in await self._c.execute(query)]

    async def count(self, conditions: Sequence[Condition]) -> int:
        query = (
            sa.select(sa.func.count())
            .select_from(sessions)
            .where(*keyset.where(sessions, conditions, _LABELS))
        )
        return int((await self._c.execute(query)).scalar_one())


class TurnRepository:
    def __init__(self, connection: AsyncConnection) -> None:
        self._c = connection

    async def add(self, turn: Turn) -> None:
        await self._c.execute(turns.insert().values(**_turn_row(turn)))

    async def save(self, turn: Turn) -> None:
        """Write back every field (last_sequence is owned by the event log and left alone)."""
        row = _turn_row(turn)
        row.pop("last_sequence")
        await self._c.execute(
            turns.update()
            .where(turns.c.session_id == turn.session_id, turns.c.id == turn.id)
            .values(**row)
        )

    async def get(self, session_id: str, turn_id: str) -> Turn | None:
        query = sa.select(turns).where(turns.c.session_id == session_id, turns.c.id == turn_id)
        row = (await self._c.execute(query)).first()
        return None if row is None else _to_turn(row)

    async def in_state(self, session_id: str, *states: TurnState) -> list[Turn]:
        query = (
            sa.select(turns)
            .where(turns.c.session_id == session_id, turns.c.state.in_([s.value for s in states]))
            .order_by(turns.c.ordinal)
        )
        return [_to_turn(row) for row in await self._c.execute(query)]

    async def renew_leases(self, driver: str, turn_ids: Sequence[str], at: datetime) -> None:
        """The turns ``turn_ids`` of the process ``driver`` are being worked on: extend their
        leases."""
        if not turn_ids:
            return
        await self._c.execute(
            turns.update()
            .where(
                turns.c.driver == driver,
                turns.c.id.in_(turn_ids),
                turns.c.state != TurnState.FINISHED.value,
            )
            .values(lease_time=at)
        )

    async def orphaned_sessions(self, lease_before: datetime, driver: str) -> list[str]:
        """Sessions with an unfinished turn whose lease ran out, or that ``driver`` (this
        process) runs: it judges those itself."""
        query = (
            sa.select(turns.c.session_id)
            .where(
                turns.c.state != TurnState.FINISHED.value,
                sa.or_(
                    turns.c.lease_time.is_(None),
                    turns.c.lease_time < lease_before,
                    turns.c.driver == driver,
                ),
            )
            .distinct()
        )
        return [row[0] for row in await self._c.execute(query)]

    async def list(self, session_id: str, page: Page) -> list[Turn]:
        """One page (with one row to spare) in turn order."""
        query = keyset.page_query(
            sa.select(turns).where(turns.c.session_id == session_id),
            turns.c.ordinal,
            turns.c.id,
            descending=False,
            page=page,
        )
        return [_to_turn(row) for row in await self._c.execute(query)]


class EventRepository:
    """The durable, ordered history of each session: sequences are assigned once, in order."""

    def __init__(self, connection: AsyncConnection) -> None:
        self._c = connection

    async def reserve(self, session_id: str, count: int) -> int:
        """Take the next ``count`` sequences of a session; returns the first. The row update
        serialises concurrent writers (row lock on PostgreSQL, the write lock on SQLite)."""
        result = await self._c.execute(
            sessions.update()
            .where(sessions.c.id == session_id)
            .values(last_sequence=sessions.c.last_sequence + count)
            .returning(sessions.c.last_sequence)
        )
        last = result.scalar_one()
        return int(last) - count + 1

    async def insert(self, session_id: str, events: Sequence[StoredEvent]) -> None:
        """Store ``events`` and move each one's turn's ``last_sequence`` to its newest event
        (one update a turn, in the batch's transaction: a turn reads its progress while it
        runs)."""
        await self._c.execute(
            session_events.insert(),
            [
                {
                    "session_id": session_id,
                    "sequence": e.sequence,
                    "turn_id": e.turn_id,
                    "type": e.type,
                    "payload": e.payload,
                }
                for e in events
            ],
        )
        newest: dict[str, int] = {}
        for e in events:
            if e.turn_id:
                newest[e.turn_id] = max(e.sequence, newest.get(e.turn_id, 0))
        for turn_id, sequence in newest.items():
            await self._c.execute(
                turns.update()
                .where(
                    turns.c.session_id == session_id,
                    turns.c.id == turn_id,
                    turns.c.last_sequence < sequence,
                )
                .values(last_sequence=sequence)
            )

    async def read(
        self, session_id: str, *, after: int, limit: int, until: int | None = None
    ) -> list[StoredEvent]:
        """Events with ``after < sequence (<= until)``, in order (the replay's hot path)."""
        c = session_events.c
        query = sa.select(c.sequence, c.turn_id, c.type, c.payload).where(
            c.session_id == session_id, c.sequence > after
        )
        if until is not None:
            query = query.where(c.sequence <= until)
        return await self._fetch(query.order_by(c.sequence).limit(limit))

    async def page(
        self,
        session_id: str,
        *,
        after: int,
        types: tuple[frozenset[str], bool] | None,
        turn_id: str | None,
        page: Page,
    ) -> list[StoredEvent]:
        """One page of history after ``after`` (with one row to spare); ``types`` is
        (names, include)."""
        c = session_events.c
        query = sa.select(c.sequence, c.turn_id, c.type, c.payload).where(
            c.session_id == session_id, c.sequence > after
        )
        if types is not None:
            names, include = types
            query = query.where(c.type.in_(names) if include else c.type.not_in(names))
        if turn_id is not None:
            query = query.where(c.turn_id == turn_id)
        return await self._fetch(
            keyset.page_query(query, c.sequence, c.sequence, descending=False, page=page)
        )

    async def _fetch(self, query: sa.Select[Any]) -> list[StoredEvent]:
        return [
            StoredEvent(row.sequence, row.turn_id, row.type, bytes(row.payload))
            for row in await self._c.execute(query)
        ]

    async def last_sequence(self, session_id: str) -> int:
        query = sa.select(sessions.c.last_sequence).where(sessions.c.id == session_id)
        return int((await self._c.execute(query)).scalar_one_or_none() or 0)


class PermissionRepository:
    def __init__(self, connection: AsyncConnection) -> None:
        self._c = connection

    async def add(self, session_id: str, request_id: str, turn_id: str, payload: bytes) -> None:
        await self._c.execute(
            permission_requests.insert().values(
                session_id=session_id, id=request_id, turn_id=turn_id, payload=payload, pending=True
            )
        )

    async def resolve(self, session_id: str, request_id: str) -> None:
        await self._c.execute(
            permission_requests.update()
            .where(
                permission_requests.c.session_id == session_id,
                permission_requests.c.id == request_id,
            )
            .values(pending=False)
        )

    async def resolve_turn(self, session_id: str, turn_id: str) -> None:
        await self._c.execute(
            permission_requests.update()
            .where(
                permission_requests.c.session_id == session_id,
                permission_requests.c.turn_id == turn_id,
            )
            .values(pending=False)
        )

    async def pending(self, session_id: str) -> list[tuple[str, str, bytes]]:
        """(request id, turn id, serialised PermissionRequest) of the open requests."""
        c = permission_requests.c
        query = sa.select(c.id, c.turn_id, c.payload).where(
            c.session_id == session_id, c.pending.is_(True)
        )
        return [(row.id, row.turn_id, bytes(row.payload)) for row in await self._c.execute(query)]


class PolicyRepository:
    def __init__(self, connection: AsyncConnection) -> None:
        self._c = connection

    async def get(self, organization: str) -> AgentPolicyRecord | None:
        query = sa.select(agent_policies).where(agent_policies.c.organization == organization)
        row = (await self._c.execute(query)).first()
        if row is None:
            return None
        m = row._mapping
        return AgentPolicyRecord(
            organization=m["organization"],
            payload=bytes(m["payload"]),
            version=m["version"],
            update_time=_aware(m["update_time"]),  # type: ignore[arg-type]
        )

    async def save(self, policy: AgentPolicyRecord) -> None:
        values = {
            "payload": policy.payload,
            "version": policy.version,
            "update_time": policy.update_time,
        }
        updated = await self._c.execute(
            agent_policies.update()
            .where(agent_policies.c.organization == policy.organization)
            .values(**values)
        )
        if updated.rowcount == 0:
            await self._c.execute(
                agent_policies.insert().values(organization=policy.organization, **values)
            )


class SessionUnitOfWork(UnitOfWork):
    sessions: SessionRepository
    turns: TurnRepository
    events: EventRepository
    permissions: PermissionRepository
    policies: PolicyRepository
    idempotency: SqlIdempotencyStore
    outbox: OutboxRecords

    def _bind(self) -> None:
        self.sessions = SessionRepository(self.connection)
        self.turns = TurnRepository(self.connection)
        self.events = EventRepository(self.connection)
        self.permissions = PermissionRepository(self.connection)
        self.policies = PolicyRepository(self.connection)
        self.idempotency = SqlIdempotencyStore(self.connection, idempotency_keys)
        self.outbox = OutboxRecords(self.connection, outbox)
