"""Audit of every state change, through the outbox (:mod:`.outbox`).

A use case adds its :class:`~.ports.AuditEntry` to the outbox in the transaction that makes the
change (or right after, for changes the runtime makes); the outbox sends it at once and, should
identity not take it, retries it until it does. Each entry's id is the WriteAuditEvents
request_id, so a retry after a write whose answer was lost stores nothing twice.

Who asked, from where and with what (request id, source address, user agent) comes from the
RPC through :data:`ORIGIN`, which the gRPC layer sets for each state-changing call.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime

from corral.libs.auth.caller import Caller
from corral.services.session.domain import now
from corral.services.session.outbox import Outbox
from corral.services.session.ports import AuditEntry, AuditWriter, OutboxItem, UnitOfWork

AUDIT = "audit"


@dataclass(frozen=True)
class Origin:
    """Where a call came from, as the audit records it."""

    request_id: str = ""
    source_ip: str = ""
    user_agent: str = ""


ORIGIN: ContextVar[Origin | None] = ContextVar("corral_session_origin", default=None)


def as_item(entry: AuditEntry) -> OutboxItem:
    payload = {k: v for k, v in vars(entry).items() if k not in {"id", "organization", "attempts"}}
    payload["event_time"] = entry.event_time.isoformat()
    return OutboxItem(entry.id, AUDIT, entry.organization, payload, entry.event_time)


def as_entry(item: OutboxItem) -> AuditEntry:
    fields = dict(item.payload)
    fields["event_time"] = datetime.fromisoformat(fields["event_time"])
    return AuditEntry(id=item.id, organization=item.organization, attempts=item.attempts, **fields)


def deliver(writer: AuditWriter) -> Callable[[OutboxItem, str], Awaitable[None]]:
    """The outbox's handler of audit entries: identity's WriteAuditEvents."""

    async def write(item: OutboxItem, token: str) -> None:
        await writer.write(as_entry(item), token=token)

    return write


class Audit:
    """Audit entries of the current call, kept and sent through the outbox."""

    def __init__(self, outbox: Outbox, *, clock: Callable[[], datetime] = now) -> None:
        self._outbox = outbox
        self._clock = clock

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
        await self._outbox.add(uow, as_item(entry))

    async def record(self, entry: AuditEntry, *, token: str) -> None:
        """Keep ``entry`` in a transaction of its own and send it."""
        await self._outbox.record(as_item(entry), token=token)

    def send(self, entry: AuditEntry, *, token: str) -> None:
        """One attempt now, in the background; a failure leaves the entry to the outbox."""
        self._outbox.send(as_item(entry), token=token)
