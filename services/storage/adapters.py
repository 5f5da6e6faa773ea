"""Adapters for the storage service's ports on identity: the usage ledger (storage bytes) and
the audit log, called as this service (its own service credentials).

Every call's ``grpc.aio.AioRpcError`` leaves here as the :mod:`corral.libs.errors` category
identity raised (its reason and details kept): the service layer never sees gRPC.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
from google.protobuf import duration_pb2

from corral.identity.v1 import audit_event_pb2, usage_pb2
from corral.identity.v1 import identity_service_pb2 as identity_pb
from corral.identity.v1 import identity_service_pb2_grpc as identity_rpc
from corral.libs.auth.service_token import CachedToken
from corral.libs.grpc.errors import from_rpc_error
from corral.services.session.ports import AuditEntry

# Holds for incoming bytes live at most as long as identity allows (24 h); an upload that takes
# longer has its early holds expire (given back), and its commit records the real bytes anyway.
HOLD_TTL_SECONDS = 24 * 3600
_BYTES = usage_pb2.USAGE_KIND_STORAGE_BYTES


@contextlib.contextmanager
def _domain_errors() -> Iterator[None]:
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from exc


class _AsService:
    def __init__(self, channel: grpc.aio.Channel, credentials: CachedToken | None) -> None:
        self._stub = identity_rpc.IdentityServiceStub(channel)
        self._credentials = credentials

    async def _metadata(self) -> tuple[tuple[str, str], ...]:
        if self._credentials is None:
            return ()
        return (("authorization", f"Bearer {await self._credentials.get()}"),)


class IdentityStorageLedger(_AsService):
    """Identity's usage ledger for USAGE_KIND_STORAGE_BYTES."""

    async def _reserve(
        self, organization: str, subject: str, amount: int, reference: str, request_id: str
    ) -> str:
        request = identity_pb.ReserveUsageRequest(
            parent=organization,
            subject=subject,
            amounts=[usage_pb2.UsageAmount(kind=_BYTES, amount=amount)],
            reference=reference,
            ttl=duration_pb2.Duration(seconds=HOLD_TTL_SECONDS),
            request_id=request_id,
        )
        with _domain_errors():
            reply = await self._stub.ReserveUsage(request, metadata=await self._metadata())
        return str(reply.usage_reservation.name)

    async def hold(
        self, *, organization: str, subject: str, amount: int, reference: str, request_id: str
    ) -> str:
        return await self._reserve(organization, subject, amount, reference, request_id)

    async def settle(self, reservation: str, amount: int) -> None:
        request = identity_pb.SettleUsageRequest(
            name=reservation, actual_amounts=[usage_pb2.UsageAmount(kind=_BYTES, amount=amount)]
        )
        with _domain_errors():
            await self._stub.SettleUsage(request, metadata=await self._metadata())

    async def record(
        self, *, organization: str, subject: str, amount: int, reference: str, request_id: str
    ) -> str:
        reservation = await self._reserve(organization, subject, 0, reference, request_id)
        await self.settle(reservation, amount)
        return reservation

    async def release(self, reservation: str) -> None:
        with _domain_errors():
            await self._stub.ReleaseUsage(
                identity_pb.ReleaseUsageRequest(name=reservation), metadata=await self._metadata()
            )


class IdentityStorageAudit(_AsService):
    """Identity's audit log; each entry's id is its WriteAuditEvents request_id, so a retried
    entry is stored once. Written as this service (the ``token`` argument is not used)."""

    async def write(self, entry: AuditEntry, *, token: str) -> None:
        event = audit_event_pb2.AuditEvent(
            actor=entry.actor,
            organization=entry.organization,
            action=entry.action,
            resource=entry.resource,
            service="storage",
            outcome=audit_event_pb2.AuditEvent.Outcome.Value(f"OUTCOME_{entry.outcome}"),
            source_ip=entry.source_ip,
            user_agent=entry.user_agent,
            request_id=entry.request_id,
            metadata=entry.metadata,
        )
        event.event_time.FromDatetime(entry.event_time)
        with _domain_errors():
            await self._stub.WriteAuditEvents(
                identity_pb.WriteAuditEventsRequest(
                    parent=entry.organization, audit_events=[event], request_id=entry.id
                ),
                metadata=await self._metadata(),
            )
