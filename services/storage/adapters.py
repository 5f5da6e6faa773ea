"""The storage service's adapter for identity's usage ledger (storage bytes), called as this
service (its own service credentials). The audit log's writer is the kit's
(:class:`corral.libs.grpc.identity.IdentityAudit`).

Every call's ``grpc.aio.AioRpcError`` leaves here as the :mod:`corral.libs.errors` category
identity raised (its reason and details kept): the service layer never sees gRPC.
"""

from __future__ import annotations

from google.protobuf import duration_pb2

from corral.identity.v1 import identity_service_pb2 as identity_pb
from corral.identity.v1 import usage_pb2
from corral.libs.grpc.errors import domain_errors
from corral.libs.grpc.identity import IdentityClient

# Holds for incoming bytes live at most as long as identity allows (24 h); an upload that takes
# longer has its early holds expire (given back), and its commit records the real bytes anyway.
HOLD_TTL_SECONDS = 24 * 3600
_BYTES = usage_pb2.USAGE_KIND_STORAGE_BYTES


class IdentityStorageLedger(IdentityClient):
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
        with domain_errors():
            reply = await self._stub.ReserveUsage(request, metadata=await self._auth())
        return str(reply.usage_reservation.name)

    async def hold(
        self, *, organization: str, subject: str, amount: int, reference: str, request_id: str
    ) -> str:
        return await self._reserve(organization, subject, amount, reference, request_id)

    async def settle(self, reservation: str, amount: int) -> None:
        request = identity_pb.SettleUsageRequest(
            name=reservation, actual_amounts=[usage_pb2.UsageAmount(kind=_BYTES, amount=amount)]
        )
        with domain_errors():
            await self._stub.SettleUsage(request, metadata=await self._auth())

    async def record(
        self, *, organization: str, subject: str, amount: int, reference: str, request_id: str
    ) -> str:
        reservation = await self._reserve(organization, subject, 0, reference, request_id)
        await self.settle(reservation, amount)
        return reservation

    async def release(self, reservation: str) -> None:
        with domain_errors():
            await self._stub.ReleaseUsage(
                identity_pb.ReleaseUsageRequest(name=reservation), metadata=await self._auth()
            )
