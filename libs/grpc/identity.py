"""Calling identity as a Corral service: the service's own credentials, the base of its
identity clients, and the audit log's writer (the :class:`corral.libs.audit.AuditWriter` of
every service that audits).

Each service keeps its own clients of identity's usage ledger (what a session turn and a
workspace hold differ); they stand on :class:`IdentityClient` like the audit writer does.
"""

from __future__ import annotations

import grpc

from corral.identity.v1 import audit_event_pb2
from corral.identity.v1 import identity_service_pb2 as identity_pb
from corral.identity.v1 import identity_service_pb2_grpc as identity_rpc
from corral.libs.audit import AuditEntry
from corral.libs.auth.service_token import CachedToken
from corral.libs.grpc.errors import domain_errors

Metadata = tuple[tuple[str, str], ...]


def bearer(token: str) -> Metadata:
    """Call metadata carrying ``token`` (none for an empty one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def service_credentials(channel: grpc.aio.Channel, api_key: str) -> CachedToken | None:
    """This service's own token (from its internal service account's API key, exchanged with
    identity on ``channel``), or None without a key."""
    if not api_key:
        return None
    stub = identity_rpc.IdentityServiceStub(channel)

    async def exchange() -> tuple[str, float]:
        with domain_errors():
            reply = await stub.ExchangeApiKey(identity_pb.ExchangeApiKeyRequest(api_key=api_key))
        grant = reply.token
        return grant.access_token, grant.access_token_expire_time.ToSeconds()

    return CachedToken(exchange)


class IdentityClient:
    """Identity's stub, called as this service when it has credentials, else with the token a
    call passes (``""``: none)."""

    def __init__(self, channel: grpc.aio.Channel, credentials: CachedToken | None) -> None:
        self._stub = identity_rpc.IdentityServiceStub(channel)
        self._credentials = credentials

    async def _auth(self, token: str = "") -> Metadata:
        return bearer(await self._credentials.get() if self._credentials else token)


class IdentityAudit(IdentityClient):
    """Identity's audit log, written as this service (or with the caller's token when the
    service has no credentials), each event marked with ``service``. Each entry's id is its
    WriteAuditEvents request_id, so a retried entry is stored once."""

    def __init__(
        self, channel: grpc.aio.Channel, credentials: CachedToken | None, *, service: str
    ) -> None:
        super().__init__(channel, credentials)
        self._service = service

    async def write(self, entry: AuditEntry, *, token: str) -> None:
        event = audit_event_pb2.AuditEvent(
            actor=entry.actor,
            organization=entry.organization,
            action=entry.action,
            resource=entry.resource,
            service=self._service,
            outcome=audit_event_pb2.AuditEvent.Outcome.Value(f"OUTCOME_{entry.outcome}"),
            source_ip=entry.source_ip,
            user_agent=entry.user_agent,
            request_id=entry.request_id,
            metadata=entry.metadata,
        )
        event.event_time.FromDatetime(entry.event_time)
        with domain_errors():
            await self._stub.WriteAuditEvents(
                identity_pb.WriteAuditEventsRequest(
                    parent=entry.organization, audit_events=[event], request_id=entry.id
                ),
                metadata=await self._auth(token),
            )
