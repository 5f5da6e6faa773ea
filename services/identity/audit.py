"""The audit log: append-only; identity's own events are written by every use case (through
:meth:`UseCases._audit`), other services' by ``WriteAuditEvents``; admins read it by
organization, superusers across all of them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from corral.libs import listing
from corral.libs.errors import InvalidArgument
from corral.services.identity.base import Context, ListResult, UseCases
from corral.services.identity.domain import AuditEvent
from corral.services.identity.queries import ListRequest, ListSpec

AUDIT_EVENTS = ListSpec(
    {
        "actor": listing.FieldSpec("actor"),
        "action": listing.FieldSpec("action", prefix=True),
        "resource": listing.FieldSpec("resource", prefix=True),
        "outcome": listing.FieldSpec(
            "outcome",
            listing.enum_value({"SUCCEEDED": "succeeded", "DENIED": "denied", "FAILED": "failed"}),
        ),
        "service": listing.FieldSpec("service"),
        "source_ip": listing.FieldSpec("source_ip"),
        "event_time": listing.FieldSpec("event_time", listing.parse_time),
    },
    {"event_time": "event_time"},
    "event_time desc",
    default_size=100,
)


class AuditLog(UseCases):
    async def list_audit_events(
        self,
        ctx: Context,
        org_id: str | None,
        request: ListRequest,
    ) -> ListResult[AuditEvent]:
        """Newest first unless ``order_by`` says ``event_time``; ``org_id`` None means every
        organization (superusers only)."""
        principal = ctx.require()
        if org_id is None:
            principal.require_superuser()
        else:
            principal.require_admin(org_id)
        query = AUDIT_EVENTS.query(request, org_id)
        async with self._uow() as uow:
            return ListResult(*await uow.audit.list(org_id, query))

    async def write_audit_events(
        self, ctx: Context, org_id: str | None, events: Sequence[AuditEvent], request_id: str
    ) -> int:
        """Other services' events. A batch is written once: a retry with the same
        ``request_id`` writes nothing and answers 0 (the proto's own retry rule)."""
        ctx.require().require_service()
        if org_id is not None and any(e.organization_id != org_id for e in events):
            raise InvalidArgument(
                "every event must belong to the parent organization", violations=[]
            )
        at = self._clock()
        async with self._uow() as uow:
            if not await uow.audit.claim_batch(request_id, len(events), at):
                return 0
            await uow.audit.append([replace(e, create_time=at) for e in events])
            await uow.commit()
        return len(events)
