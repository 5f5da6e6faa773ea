"""The outbox: effects on other services that must happen, kept in the service's own database
and retried until they do (session and storage each have one, on their own ``outbox`` table).

A use case adds an :class:`OutboxItem` to the ``outbox`` table in the transaction of the change
it follows from (a turn's end and the settle of its usage; a state change and its audit entry),
then one attempt is made at once, in the background. An item that could not be delivered stays
in the table and the outbox's loop (:meth:`Outbox.run`, a background job of every replica)
retries it with exponential backoff (1 s doubling to 5 min) until it is. Replicas claim an item
before sending it. The receiving side must be idempotent (an audit entry's id is its
request_id; identity's SettleUsage and ReleaseUsage answer a retry as the first call), so an
attempt whose answer was lost is simply made again. Retries go as the service itself (its
credentials), never with a user's token, which may have expired by then.

Each kind of item has one handler (:meth:`Outbox.handle`; ``audit``: :mod:`corral.libs.audit`).
An item the other side refuses for good (NOT_FOUND, FAILED_PRECONDITION, INVALID_ARGUMENT,
ALREADY_EXISTS) is logged as an error and dropped; any other failure (the other service down, a
deadline, a refused credential) is retried, with one warning per kind every half minute, not
one per attempt.

The outbox needs of a service's unit of work only its ``outbox`` store (:class:`OutboxStore`,
:class:`OutboxRecords` on the table :func:`outbox_table` makes in the service's metadata), the
transaction and its commit: :class:`OutboxUnitOfWork`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Protocol, Self

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from corral.libs.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger("corral.outbox")

FIRST_RETRY = timedelta(seconds=1)
MAX_BACKOFF = timedelta(minutes=5)
# How long an item's immediate attempt may take before the loop considers it lost (a crash
# between the commit and the attempt), and how long a replica's claim holds.
CLAIM = timedelta(seconds=60)
BATCH = 100
WARN_EVERY_SECONDS = 30.0
# Refusals a retry cannot change: the item is dropped (and logged).
FINAL = (InvalidArgument, NotFound, FailedPrecondition, AlreadyExists)


@dataclass
class OutboxItem:
    """An effect on another service that must happen: its ``kind`` names the handler,
    ``payload`` (JSON, no secrets) says what to do."""

    id: str
    kind: str
    organization: str
    payload: dict[str, Any]
    create_time: datetime
    attempts: int = 0


class OutboxStore(Protocol):
    """Effects waiting to reach other services (written in the transaction of the change)."""

    async def add(self, item: OutboxItem, next_attempt: datetime) -> None: ...

    async def due(self, at: datetime, limit: int) -> list[tuple[OutboxItem, datetime]]:
        """Items whose next attempt is at or before ``at``, oldest first, with that time."""
        ...

    async def claim(self, item_id: str, seen: datetime, until: datetime) -> bool:
        """Move the next attempt from ``seen`` to ``until``; False if another replica did."""
        ...

    async def delivered(self, item_id: str) -> None: ...

    async def failed(
        self, item_id: str, attempts: int, next_attempt: datetime, error: str
    ) -> None: ...


class OutboxUnitOfWork(Protocol):
    """What the outbox needs of a service's unit of work: one transaction with its
    ``outbox`` store (``async with uow: ...; await uow.commit()``; no commit, no change)."""

    @property
    def outbox(self) -> OutboxStore: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def commit(self) -> None: ...


def _now() -> datetime:
    return datetime.now(UTC)


Handler = Callable[[OutboxItem, str], Awaitable[None]]  # (item, token: "" = as the service)


def outbox_table(metadata: sa.MetaData) -> sa.Table:
    """The ``outbox`` table in a service's own ``metadata`` (each service migrates its own)."""
    return sa.Table(
        "outbox",
        metadata,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("organization", sa.String(200), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),  # JSON (no secrets in it)
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt", sa.DateTime(timezone=True), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.String(500), nullable=False),
        sa.Index("ix_outbox_next_attempt", "next_attempt"),
    )


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


class OutboxRecords:
    """The ``outbox`` table on one connection (an :class:`OutboxStore`)."""

    def __init__(self, connection: AsyncConnection, table: sa.Table) -> None:
        self._c = connection
        self._t = table

    async def add(self, item: OutboxItem, next_attempt: datetime) -> None:
        await self._c.execute(
            self._t.insert().values(
                id=item.id,
                kind=item.kind,
                organization=item.organization,
                payload=json.dumps(item.payload, sort_keys=True),
                attempts=item.attempts,
                next_attempt=next_attempt,
                create_time=item.create_time,
                last_error="",
            )
        )

    async def due(self, at: datetime, limit: int) -> list[tuple[OutboxItem, datetime]]:
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
            item = OutboxItem(
                id=m["id"],
                kind=m["kind"],
                organization=m["organization"],
                payload=json.loads(m["payload"]),
                create_time=_aware(m["create_time"]),
                attempts=m["attempts"],
            )
            out.append((item, _aware(m["next_attempt"])))
        return out

    async def claim(self, item_id: str, seen: datetime, until: datetime) -> bool:
        c = self._t.c
        result = await self._c.execute(
            self._t.update()
            .where(c.id == item_id, c.next_attempt == seen)
            .values(next_attempt=until)
        )
        return bool(result.rowcount == 1)

    async def delivered(self, item_id: str) -> None:
        await self._c.execute(self._t.delete().where(self._t.c.id == item_id))

    async def failed(self, item_id: str, attempts: int, next_attempt: datetime, error: str) -> None:
        await self._c.execute(
            self._t.update()
            .where(self._t.c.id == item_id)
            .values(attempts=attempts, next_attempt=next_attempt, last_error=error[:500])
        )


def backoff(attempts: int) -> timedelta:
    """1 s, 2 s, 4 s, ... up to 5 minutes between attempts."""
    delay: timedelta = FIRST_RETRY * (2 ** min(max(attempts - 1, 0), 16))
    return min(delay, MAX_BACKOFF)


@dataclass
class _Warnings:
    """At most one warning per kind every WARN_EVERY_SECONDS, counting what it left out."""

    last: dict[str, float] = field(default_factory=dict)
    quiet: dict[str, int] = field(default_factory=dict)

    def failed(self, item: OutboxItem, exc: Exception) -> None:
        at = time.monotonic()
        if at - self.last.get(item.kind, -math.inf) < WARN_EVERY_SECONDS:
            self.quiet[item.kind] = self.quiet.get(item.kind, 0) + 1
            return
        self.last[item.kind] = at
        log.warning(
            "outbox delivery failed; will retry",
            extra={
                "kind": item.kind,
                "attempts": item.attempts,
                "error": repr(exc)[:300],
                "failures_not_logged": self.quiet.pop(item.kind, 0),
            },
        )


class Outbox:
    def __init__(
        self,
        uow: Callable[[], OutboxUnitOfWork],
        *,
        clock: Callable[[], datetime] = _now,
        poll_seconds: float = 2.0,
    ) -> None:
        self._uow = uow
        self._clock = clock
        self._poll = poll_seconds
        self._handlers: dict[str, Handler] = {}
        self._tasks: set[asyncio.Task[bool]] = set()
        self._warnings = _Warnings()

    def handle(self, kind: str, handler: Handler) -> None:
        self._handlers[kind] = handler

    async def add(self, uow: OutboxUnitOfWork, item: OutboxItem) -> None:
        """Keep ``item`` in ``uow``'s transaction; call :meth:`send` after the commit."""
        await uow.outbox.add(item, self._clock() + CLAIM)

    async def record(self, item: OutboxItem, *, token: str) -> None:
        """Keep ``item`` in a transaction of its own and send it."""
        async with self._uow() as uow:
            await self.add(uow, item)
            await uow.commit()
        self.send(item, token=token)

    def send(self, item: OutboxItem, *, token: str) -> None:
        """One attempt now, in the background (the call that made the change does not wait
        for the other service); a failure leaves the item to the retry loop."""
        task = asyncio.create_task(self._attempt_quietly(item, token))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def deliver(self, item: OutboxItem, *, token: str) -> bool:
        """One attempt now, awaited (an effect the caller should find done when the other
        service answers); a failure leaves the item to the retry loop. True if delivered."""
        return await self._attempt_quietly(item, token)

    async def _attempt_quietly(self, item: OutboxItem, token: str) -> bool:
        try:
            return await self._attempt(item, token)
        except Exception:  # the database: the item stays due and the loop retries it
            log.warning("outbox update failed", extra={"kind": item.kind}, exc_info=True)
            return False

    async def _attempt(self, item: OutboxItem, token: str) -> bool:
        try:
            await self._handlers[item.kind](item, token)
        except FINAL as exc:
            log.error(
                "outbox item refused for good; dropped",
                extra={"kind": item.kind, "item": item.id, "reason": exc.reason, "error": str(exc)},
            )
        except Exception as exc:
            item.attempts += 1
            self._warnings.failed(item, exc)
            async with self._uow() as uow:
                await uow.outbox.failed(
                    item.id, item.attempts, self._clock() + backoff(item.attempts), repr(exc)
                )
                await uow.commit()
            return False
        else:
            if item.attempts:
                log.info(
                    "outbox item delivered after retries",
                    extra={"kind": item.kind, "attempts": item.attempts + 1},
                )
        async with self._uow() as uow:
            await uow.outbox.delivered(item.id)
            await uow.commit()
        return True

    async def drain(self) -> int:
        """Send every item that is due (as the service: no user's token is kept); returns how
        many were delivered."""
        at = self._clock()
        async with self._uow() as uow:
            due = await uow.outbox.due(at, BATCH)
        sent = 0
        for item, seen in due:
            async with self._uow() as uow:
                mine = await uow.outbox.claim(item.id, seen, at + CLAIM)
                await uow.commit()
            if mine:
                sent += await self._attempt(item, "")
        return sent

    async def run(self) -> None:
        """The retry loop: drain every ``poll_seconds`` (a background job of the service)."""
        while True:
            await asyncio.sleep(self._poll)
            try:
                await self.drain()
            except Exception as exc:  # the database: one warning every half minute
                self._warnings.failed(OutboxItem("", "drain", "", {}, self._clock()), exc)

    async def settle(self) -> None:
        """Wait for the immediate attempts in flight (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
