"""Adapters for the session service's ports: the runtime, storage and identity over gRPC.

Every call's ``grpc.aio.AioRpcError`` leaves here as the :mod:`corral.libs.errors` category the
other service raised (its reason and details kept): the service layer never sees gRPC.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator

import grpc
from google.protobuf import duration_pb2, struct_pb2

from corral.identity.v1 import identity_service_pb2 as identity_pb
from corral.identity.v1 import quota_pb2, usage_pb2
from corral.libs.auth.service_token import CachedToken
from corral.libs.errors import (
    CorralError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from corral.libs.grpc.errors import domain_errors, from_rpc_error
from corral.libs.grpc.identity import IdentityClient, bearer
from corral.runtime.v1 import runtime_event_pb2 as rt
from corral.runtime.v1 import runtime_service_pb2 as runtime_pb
from corral.runtime.v1 import runtime_service_pb2_grpc as runtime_rpc
from corral.services.session.domain import Usage
from corral.services.session.ports import TurnRequest
from corral.storage.v1 import storage_service_pb2 as storage_pb
from corral.storage.v1 import storage_service_pb2_grpc as storage_rpc
from corral.storage.v1 import workspace_pb2

log = logging.getLogger("corral.session")


def _turn_error(exc: grpc.aio.AioRpcError) -> CorralError:
    """A turn's stream that broke off: the runtime's own error when it sent one, else
    RUNTIME_UNAVAILABLE (it died, or the connection did)."""
    error = from_rpc_error(exc)
    if error.reason in (exc.code().name, "DEPENDENCY_FAILED"):
        return Unavailable(
            f"the agent runtime failed: {exc.code().name}", reason="RUNTIME_UNAVAILABLE"
        )
    return error


class GrpcRuntime:
    """The agent-runtime service, called as this service (its own service credentials): the
    runtime answers internal service principals only. The user a turn is for is named in the
    request (``actor``); their token is never forwarded, so a queued turn still runs after it
    expires. The ``token`` arguments of the port are ignored here. Without credentials the
    calls carry no token, and the runtime refuses them."""

    def __init__(self, channel: grpc.aio.Channel, credentials: CachedToken | None = None) -> None:
        self._stub = runtime_rpc.RuntimeServiceStub(channel)
        self._credentials = credentials

    async def _metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer(await self._credentials.get()) if self._credentials else ()

    async def run_turn(self, request: TurnRequest, *, token: str) -> AsyncIterator[rt.RuntimeEvent]:
        call = self._stub.RunTurn(
            runtime_pb.RunTurnRequest(
                session=request.session,
                turn_id=request.turn_id,
                organization=request.organization,
                actor=request.actor,
                workspace=request.workspace,
                options=request.options,
                prompt=request.prompt,
                resume_transcript_id=request.resume_transcript_id,
                fork_transcript=request.fork_transcript,
            ),
            metadata=await self._metadata(),
        )
        try:
            async for response in call:
                yield response.event
        except grpc.aio.AioRpcError as exc:
            raise _turn_error(exc) from exc

    async def interrupt(self, session: str, turn_id: str, *, token: str) -> None:
        with domain_errors():
            await self._stub.InterruptTurn(
                runtime_pb.InterruptTurnRequest(session=session, turn_id=turn_id),
                metadata=await self._metadata(),
            )

    async def decide(
        self,
        session: str,
        turn_id: str,
        request_id: str,
        *,
        allow: bool,
        message: str,
        updated_input: struct_pb2.Struct | None,
        decided_by: str,
        token: str,
    ) -> None:
        request = runtime_pb.SubmitPermissionDecisionRequest(
            session=session,
            turn_id=turn_id,
            permission_request_id=request_id,
            behavior=rt.PERMISSION_BEHAVIOR_ALLOW if allow else rt.PERMISSION_BEHAVIOR_DENY,
            decided_by=decided_by,
            message=message,
        )
        if updated_input is not None:
            request.updated_input.CopyFrom(updated_input)
        with domain_errors():
            await self._stub.SubmitPermissionDecision(request, metadata=await self._metadata())

    async def release(self, session: str, *, delete_transcript: bool, token: str) -> None:
        with domain_errors():
            await self._stub.ReleaseSession(
                runtime_pb.ReleaseSessionRequest(
                    session=session, delete_transcript=delete_transcript
                ),
                metadata=await self._metadata(),
            )


STORAGE_QUOTA_REASONS = frozenset({"STORAGE_QUOTA_EXCEEDED", "QUOTA_EXCEEDED"})


def _workspace_error(error: CorralError, what: str) -> CorralError:
    """Storage's answer in the session API's terms: a full quota is QUOTA_EXCEEDED (its
    QuotaFailure kept), a missing workspace stays NOT_FOUND, and anything else (storage down or
    slow, its rate limit, a refused service credential) is WORKSPACE_UNAVAILABLE: nothing the
    session's caller sent, so retry."""
    if isinstance(error, ResourceExhausted) and error.reason in STORAGE_QUOTA_REASONS:
        return ResourceExhausted(
            "the storage quota has no room for the workspace",
            reason="QUOTA_EXCEEDED",
            violations=error.violations,
        )
    if isinstance(error, NotFound):
        return error
    log.warning(
        "the storage service could not %s a workspace",
        what,
        extra={"reason": error.reason, "error": error.message[:300]},
    )
    retry_after = getattr(error, "retry_after_seconds", None)
    return Unavailable(
        f"the storage service could not {what} the session's workspace ({error.reason}); retry",
        reason="WORKSPACE_UNAVAILABLE",
        retry_after_seconds=retry_after if retry_after is not None else 1.0,
        metadata={"cause": error.reason},
    )


@contextlib.contextmanager
def _workspace_errors(what: str) -> Iterator[None]:
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise _workspace_error(from_rpc_error(exc), what) from exc
    except CorralError as exc:  # this service's own credentials could not be had
        raise _workspace_error(exc, what) from exc


class GrpcStorage:
    """The storage service's workspaces, called as this service (its own service credentials:
    storage creates and copies workspaces for Corral's services only), naming the session's
    owner, whose storage quota the workspace uses."""

    def __init__(self, channel: grpc.aio.Channel, credentials: CachedToken | None) -> None:
        self._stub = storage_rpc.StorageServiceStub(channel)
        self._credentials = credentials

    async def _metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer(await self._credentials.get()) if self._credentials else ()

    async def create(self, *, organization: str, session: str, owner: str, request_id: str) -> str:
        request = storage_pb.CreateWorkspaceRequest(
            workspace=workspace_pb2.Workspace(
                organization=organization, session=session, owner=owner
            ),
            request_id=request_id,
        )
        with _workspace_errors("create"):
            reply = await self._stub.CreateWorkspace(request, metadata=await self._metadata())
        return str(reply.workspace.name)

    async def clone(self, source: str, *, session: str, owner: str, request_id: str) -> str:
        request = storage_pb.CloneWorkspaceRequest(
            name=source, session=session, owner=owner, request_id=request_id
        )
        with _workspace_errors("copy"):
            reply = await self._stub.CloneWorkspace(request, metadata=await self._metadata())
        return str(reply.workspace.name)

    async def delete(self, workspace: str) -> None:
        with contextlib.suppress(NotFound), _workspace_errors("delete"):
            await self._stub.DeleteWorkspace(
                storage_pb.DeleteWorkspaceRequest(name=workspace), metadata=await self._metadata()
            )


class IdentityLedger(IdentityClient):
    """Identity's usage ledger: one session slot plus a token of budget is held while a turn
    runs (so an exhausted monthly budget stops the turn before it starts); the turn's real
    tokens and cost are settled when it ends, and the slot released."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        credentials: CachedToken | None,
        *,
        ttl_seconds: int = 6 * 3600,
    ) -> None:
        super().__init__(channel, credentials)
        self._ttl = ttl_seconds

    async def reserve(self, *, organization: str, user: str, request_id: str, token: str) -> str:
        request = identity_pb.ReserveUsageRequest(
            parent=organization,
            subject=user,
            amounts=[
                usage_pb2.UsageAmount(kind=usage_pb2.USAGE_KIND_SESSIONS, amount=1),
                usage_pb2.UsageAmount(kind=usage_pb2.USAGE_KIND_TOKENS, amount=1),
                usage_pb2.UsageAmount(kind=usage_pb2.USAGE_KIND_COST_USD_MICROS, amount=1),
            ],
            reference="session turn",
            ttl=duration_pb2.Duration(seconds=self._ttl),
            request_id=request_id,
        )
        with domain_errors():
            reply = await self._stub.ReserveUsage(request, metadata=await self._auth(token))
        return str(reply.usage_reservation.name)

    async def reserve_budget(
        self, *, organization: str, user: str, cost_usd_micros: int, request_id: str, token: str
    ) -> str:
        """Hold a running turn's spending cap (cost only): N concurrent turns hold N caps. The
        hold is released when the turn ends; its real cost is settled on its slot's
        reservation."""
        request = identity_pb.ReserveUsageRequest(
            parent=organization,
            subject=user,
            amounts=[
                usage_pb2.UsageAmount(
                    kind=usage_pb2.USAGE_KIND_COST_USD_MICROS, amount=cost_usd_micros
                )
            ],
            reference="session turn budget",
            ttl=duration_pb2.Duration(seconds=self._ttl),
            request_id=request_id,
        )
        with domain_errors():
            reply = await self._stub.ReserveUsage(request, metadata=await self._auth(token))
        return str(reply.usage_reservation.name)

    async def remaining_budget(self, *, organization: str, user: str, token: str) -> int | None:
        """What the organisation's (and the user's) monthly cost budget still allows, net of
        what is held; None when neither has a cost limit (or neither can be read). Read as this
        service, else with ``token`` (the sender's, for quotas identity shows members only)."""
        subjects = [organization] + ([user] if "/users/" in user else [])
        left: list[int] = []
        for subject in subjects:
            quota = await self._quota(f"{subject}/quota", token)
            if quota is None or not quota.HasField("cost_usd_micros_per_month"):
                continue
            used = quota.usage.cost_usd_micros + quota.usage.reserved_cost_usd_micros
            left.append(quota.cost_usd_micros_per_month - used)
        return min(left) if left else None

    async def _quota(self, name: str, token: str) -> quota_pb2.Quota | None:
        tokens = [await self._auth(token)] + (
            [bearer(token)] if self._credentials and token else []
        )
        for metadata in tokens:
            try:
                with domain_errors():
                    reply = await self._stub.GetQuota(
                        identity_pb.GetQuotaRequest(name=name), metadata=metadata
                    )
                return reply.quota
            except (NotFound, PermissionDenied, Unauthenticated):
                continue
        return None

    async def settle(self, reservation: str, usage: Usage, *, token: str) -> None:
        request = identity_pb.SettleUsageRequest(
            name=reservation,
            actual_amounts=[
                usage_pb2.UsageAmount(kind=usage_pb2.USAGE_KIND_SESSIONS, amount=1),
                usage_pb2.UsageAmount(kind=usage_pb2.USAGE_KIND_TOKENS, amount=usage.tokens),
                usage_pb2.UsageAmount(
                    kind=usage_pb2.USAGE_KIND_COST_USD_MICROS, amount=usage.cost_usd_micros
                ),
            ],
        )
        with domain_errors():
            await self._stub.SettleUsage(request, metadata=await self._auth(token))
        await self.release(reservation, token=token)

    async def release(self, reservation: str, *, token: str) -> None:
        with domain_errors():
            await self._stub.ReleaseUsage(
                identity_pb.ReleaseUsageRequest(name=reservation), metadata=await self._auth(token)
            )
