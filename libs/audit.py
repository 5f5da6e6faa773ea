"""Audit of every state change, through the service's outbox (:mod:`corral.libs.outbox`).

A use case adds its :class:`AuditEntry` to the outbox in the transaction that makes the change
(or right after, for changes made elsewhere); the outbox sends it at once and, should identity
not take it, retries it until it does. Each entry's id is the WriteAuditEvents request_id, so a
retry after a write whose answer was lost stores nothing twice. The writer of entries is a port
(:class:`AuditWriter`; identity's over gRPC: :class:`corral.libs.grpc.identity.IdentityAudit`).

Who asked, from where and with what (request id, source address, user agent) comes from the
RPC through :data:`ORIGIN`, which the servicer sets for each state-changing call
(:class:`CallOrigins`).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from corral.libs.auth.caller import Caller
from corral.libs.config import Settings
from corral.libs.outbox import Outbox, OutboxItem, OutboxUnitOfWork
from corral.libs.ratelimit import Networks, client_address, trusted_networks

AUDIT = "audit"  # the outbox kind of audit entries


@dataclass
class AuditEntry:
    """One audit event as identity's WriteAuditEvents takes it. ``id`` (a UUID4) is the
    batch's request_id: identity stores a retried entry once."""

    id: str
    organization: str
    actor: str
    action: str
    resource: str
    outcome: str  # SUCCEEDED, DENIED or FAILED
    event_time: datetime
    request_id: str = ""  # the call's x-request-id
    source_ip: str = ""
    user_agent: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    attempts: int = 0


@runtime_checkable
class AuditWriter(Protocol):
    """Identity's audit log, entry by entry; raises (a libs.errors category) when the write
    did not happen. ``token``: the caller's, when still at hand (else service credentials)."""

    async def write(self, entry: AuditEntry, *, token: str) -> None: ...


@dataclass(frozen=True)
class Origin:
    """Where a call came from, as the audit records it."""

    request_id: str = ""
    source_ip: str = ""
    user_agent: str = ""


ORIGIN: ContextVar[Origin | None] = ContextVar("corral_call_origin", default=None)


class CallOrigins:
    """Sets :data:`ORIGIN` for a state-changing gRPC call (``capture(context)``, before the use
    case runs). ``trusted_proxies``: who may name the client's address (the edge); the
    deployment's CORRAL_TRUSTED_PROXIES if not given."""

    def __init__(self, trusted_proxies: Networks | None = None) -> None:
        self._trusted = (
            trusted_networks(Settings().trusted_proxies)
            if trusted_proxies is None
            else trusted_proxies
        )

    def capture(self, context: Any) -> None:
        """Where this call comes from: its x-request-id (the client's, else the one the kit
        gave the call), the client's address (as a trusted proxy names it) and user agent."""
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        trailing = dict(context.trailing_metadata() or ())
        ORIGIN.set(
            Origin(
                request_id=str(metadata.get("x-request-id") or trailing.get("x-request-id", "")),
                source_ip=client_address(context.peer() or "", metadata, self._trusted),
                user_agent=metadata.get("user-agent", "")[:256],
            )
        )


def as_item(entry: AuditEntry) -> OutboxItem:
    payload = {k: v for k, v in vars(entry).items() if k not in {"id", "organization", "attempts"}}
    payload["event_time"] = entry.event_time.isoformat()
    return OutboxItem(entry.id, AUDIT, entry.organization, payload, entry.event_time)


def as_entry(item: OutboxItem) -> AuditEntry:
    fields = dict(item.payload)
    fields["event_time"] = datetime.fromisoformat(fields["event_time"])
    return AuditEntry(id=item.id, organization=item.organization, attempts=item.attempts, **fields)


def deliver(writer: AuditWriter) -> Callable[[OutboxItem, str], Awaitable[None]]:
    """The outbox's handler of audit entries (kind :data:`AUDIT`): ``writer.write``."""

    async def write(item: OutboxItem, token: str) -> None:
        await writer.write(as_entry(item), token=token)

    return write


def _now() -> datetime:
    return datetime.now(UTC)


class Audit:
    """Audit entries of the current call, kept and sent through the outbox."""

    def __init__(self, outbox: Outbox, *, clock: Callable[[], datetime] = _now) -> None:
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

    async def add(self, uow: OutboxUnitOfWork, entry: AuditEntry) -> None:
        """Keep ``entry`` in ``uow``'s transaction; call :meth:`send` after the commit."""
        await self._outbox.add(uow, as_item(entry))

    async def record(self, entry: AuditEntry, *, token: str) -> None:
        """Keep ``entry`` in a transaction of its own and send it."""
        await self._outbox.record(as_item(entry), token=token)

    def send(self, entry: AuditEntry, *, token: str) -> None:
        """One attempt now, in the background; a failure leaves the entry to the outbox."""
        self._outbox.send(as_item(entry), token=token)
