"""Audit of every state change, through a durable outbox.

A use case adds its :class:`~.ports.AuditEntry` to the ``audit_outbox`` table in the
transaction that makes the change (or right after, for changes the runtime makes), then one
attempt is made at once, in the background. An entry that could not be written stays in the
table and the outbox's loop (:meth:`AuditOutbox.run`, a background job of the service) retries
it with exponential backoff until identity has it. Each entry's id is the WriteAuditEvents
request_id, so a retry after a write whose answer was lost stores nothing twice. Replicas claim
an entry before sending it.

Who asked, from where and with what (request id, source address, user agent) comes from the
RPC through :data:`ORIGIN`, which the gRPC layer sets for each state-changing call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from corral.libs.auth.caller import Caller
from corral.services.session.domain import now
from corral.services.session.ports import AuditEntry, AuditWriter, UnitOfWork

log = logging.getLogger("corral.session.audit")

FIRST_RETRY = timedelta(seconds=1)
MAX_BACKOFF = timedelta(minutes=5)
# How long an entry's immediate attempt may take before the loop considers it lost (a crash
# between the commit and the attempt), and how long a replica's claim holds.
CLAIM = timedelta(seconds=60)
BATCH = 100


@dataclass(frozen=True)
class Origin:
    """Where a call came from, as the audit records it."""

    request_id: str = ""
    source_ip: str = ""
    user_agent: str = ""


ORIGIN: ContextVar[Origin | None] = ContextVar("corral_session_origin", default=None)


def outbox_table(metadata: sa.MetaData) -> sa.Table:
    return sa.Table(
        "audit_outbox",
        metadata,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("organization", sa.String(200), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),  # the entry as JSON (no secrets in it)
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt", sa.DateTime(timezone=True), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.String(500), nullable=False),
        sa.Index("ix_audit_outbox_next_attempt", "next_attempt"),
    )


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


class OutboxRecords:
    """The ``audit_outbox`` table on one connection (:class:`~.ports.AuditOutboxStore`)."""

    def __init__(self, connection: AsyncConnection, table: sa.Table) -> None:
        self._c = connection
        self._t = table

    async def add(self, entry: AuditEntry, next_attempt: datetime) -> None:
        payload = {
            k: v for k, v in vars(entry).items() if k not in {"id", "organization", "attempts"}
        }
        payload["event_time"] = entry.event_time.isoformat()
        await self._c.execute(
            self._t.insert().values(
                id=entry.id,
                organization=entry.organization,
                payload=json.dumps(payload, sort_keys=True),
                attempts=entry.attempts,
                next_attempt=next_attempt,
                create_time=entry.event_time,
                last_error="",
            )
        )

    async def due(self, at: datetime, limit: int) -> list[tuple[AuditEntry, datetime]]:
        c = self._t.c
        query = (
            sa.select(self._t)
            .where(c.next_attempt <= at)
            .order_by(c.create_time, c.id)
            .limit(limit)
        )
        out = []
        for row in await self._c.execute(query):
            m = row._mapping
            fields: dict[str, Any] = json.loads(m["payload"])
            fields["event_time"] = datetime.fromisoformat(fields["event_time"])
            entry = AuditEntry(
                id=m["id"], organization=m["organization"], attempts=m["attempts"], **fields
            )
            out.append((entry, _aware(m["next_attempt"])))
        return out

    async def claim(self, entry_id: str, seen: datetime, until: datetime) -> bool:
        c = self._t.c
        result = await self._c.execute(
            self._t.update()
            .where(c.id == entry_id, c.next_attempt == seen)
            .values(next_attempt=until)
        )
        return bool(result.rowcount == 1)

    async def delivered(self, entry_id: str) -> None:
        await self._c.execute(self._t.delete().where(self._t.c.id == entry_id))

    async def failed(
        self, entry_id: str, attempts: int, next_attempt: datetime, error: str
    ) -> None:
        await self._c.execute(
            self._t.update()
            .where(self._t.c.id == entry_id)
            .values(attempts=attempts, next_attempt=next_attempt, last_error=error[:500])
        )


def backoff(attempts: int) -> timedelta:
    """1 s, 2 s, 4 s, ... up to 5 minutes between attempts."""
    delay: timedelta = FIRST_RETRY * (2 ** min(max(attempts - 1, 0), 16))
    return min(delay, MAX_BACKOFF)


class AuditOutbox:
    def __init__(
        self,
        uow: Callable[[], UnitOfWork],
        writer: AuditWriter,
        *,
        clock: Callable[[], datetime] = now,
        poll_seconds: float = 2.0,
    ) -> None:
        self._uow = uow
        self._writer = writer
        self._clock = clock
        self._poll = poll_seconds
        self._tasks: set[asyncio.Task[None]] = set()

    def entry(
        self,
        caller: Caller,
        action: str,
        resource: str,
        metadata: Mapping[str, str] | None = None,
        *,
        organization: str = "",
        outcome: str = "SUCCEEDED",
    ) -> AuditEntry:
        """An entry for ``caller``'s ``action`` in the current call (its :data:`ORIGIN`)."""
        origin = ORIGIN.get() or Origin()
        return AuditEntry(
            id=str(uuid.uuid4()),
            organization=organization or caller.organization,
            actor=caller.subject,
            action=action,
            resource=resource,
            outcome=outcome,
            event_time=self._clock(),
            request_id=origin.request_id,
            source_ip=origin.source_ip,
            user_agent=origin.user_agent,
            metadata=dict(metadata or {}),
        )

    async def add(self, uow: UnitOfWork, entry: AuditEntry) -> None:
        """Keep ``entry`` in ``uow``'s transaction; call :meth:`send` after the commit."""
        await uow.outbox.add(entry, self._clock() + CLAIM)

    async def record(self, entry: AuditEntry, *, token: str) -> None:
        """Keep ``entry`` in a transaction of its own and send it."""
        async with self._uow() as uow:
            await self.add(uow, entry)
            await uow.commit()
        self.send(entry, token=token)

    def send(self, entry: AuditEntry, *, token: str) -> None:
        """One attempt now, in the background (the call that made the change does not wait
        for identity); a failure leaves the entry to the retry loop."""
        task = asyncio.create_task(self._attempt_quietly(entry, token))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _attempt_quietly(self, entry: AuditEntry, token: str) -> None:
        try:
            await self._attempt(entry, token)
        except Exception:  # the database: the entry stays due and the loop retries it
            log.exception("audit outbox update failed", extra={"action": entry.action})

    async def _attempt(self, entry: AuditEntry, token: str) -> bool:
        try:
            await self._writer.write(entry, token=token)
        except Exception as exc:
            entry.attempts += 1
            log.warning(
                "audit write failed; will retry",
                extra={"action": entry.action, "attempts": entry.attempts, "error": str(exc)},
            )
            async with self._uow() as uow:
                await uow.outbox.failed(
                    entry.id, entry.attempts, self._clock() + backoff(entry.attempts), repr(exc)
                )
                await uow.commit()
            return False
        async with self._uow() as uow:
            await uow.outbox.delivered(entry.id)
            await uow.commit()
        return True

    async def drain(self) -> int:
        """Send every entry that is due (with the service's credentials: the caller's token is
        not kept); returns how many reached identity."""
        at = self._clock()
        async with self._uow() as uow:
            due = await uow.outbox.due(at, BATCH)
        sent = 0
        for entry, seen in due:
            async with self._uow() as uow:
                mine = await uow.outbox.claim(entry.id, seen, at + CLAIM)
                await uow.commit()
            if mine:
                sent += await self._attempt(entry, "")
        return sent

    async def run(self) -> None:
        """The retry loop: drain every ``poll_seconds`` (a background job of the service)."""
        while True:
            await asyncio.sleep(self._poll)
            try:
                await self.drain()
            except Exception:
                log.exception("audit outbox drain failed")

    async def settle(self) -> None:
        """Wait for the immediate attempts in flight (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
