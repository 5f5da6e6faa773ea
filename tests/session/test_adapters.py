"""The adapters give the service layer domain errors, never gRPC ones: what the runtime or
identity said (category, reason) survives; a broken turn stream is RUNTIME_UNAVAILABLE."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from corral.identity.v1 import identity_service_pb2_grpc as identity_rpc
from corral.libs import errors
from corral.libs.auth.service_token import CachedToken
from corral.libs.grpc.errors import to_status
from corral.runtime.v1 import agent_options_pb2 as runtime_options
from corral.runtime.v1 import runtime_event_pb2 as rt
from corral.runtime.v1 import runtime_service_pb2 as runtime_pb
from corral.runtime.v1 import runtime_service_pb2_grpc as runtime_rpc
from corral.services.session.adapters import GrpcRuntime, IdentityLedger
from corral.services.session.domain import Usage
from corral.services.session.ports import TurnRequest


async def _abort(context: Any, error: errors.CorralError) -> None:
    status = to_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)


class BrokenRuntime(runtime_rpc.RuntimeServiceServicer):
    async def RunTurn(self, request: Any, context: Any) -> AsyncIterator[Any]:  # type: ignore[override]
        yield runtime_pb.RunTurnResponse(event=rt.RuntimeEvent(turn_id=request.turn_id))
        await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")

    async def InterruptTurn(self, request: Any, context: Any) -> Any:
        await _abort(context, errors.FailedPrecondition("no turn", reason="TURN_NOT_IN_PROGRESS"))

    async def ReleaseSession(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "down")


class BrokenIdentity(identity_rpc.IdentityServiceServicer):
    async def ReserveUsage(self, request: Any, context: Any) -> Any:
        await _abort(context, errors.ResourceExhausted("used up", reason="QUOTA_EXCEEDED"))

    async def SettleUsage(self, request: Any, context: Any) -> Any:
        await _abort(context, errors.NotFound("no such", reason="RESERVATION_NOT_FOUND"))

    async def ReleaseUsage(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "down")


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server()
    runtime_rpc.add_RuntimeServiceServicer_to_server(BrokenRuntime(), server)
    identity_rpc.add_IdentityServiceServicer_to_server(BrokenIdentity(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as opened:
        yield opened
    await server.stop(0)


async def test_runtime_failures_arrive_as_domain_errors(channel: grpc.aio.Channel) -> None:
    runtime = GrpcRuntime(channel)
    request = TurnRequest(
        "sessions/s1",
        "t1",
        "organizations/acme",
        "u",
        "workspaces/s1",
        runtime_options.AgentOptions(),
        "hi",
        "",
        False,
    )
    seen = []
    with pytest.raises(errors.Unavailable) as broken:
        async for event in runtime.run_turn(request, token=""):
            seen.append(event)
    assert len(seen) == 1 and broken.value.reason == "RUNTIME_UNAVAILABLE"
    with pytest.raises(errors.FailedPrecondition) as refused:
        await runtime.interrupt("sessions/s1", "t1", token="")
    assert refused.value.reason == "TURN_NOT_IN_PROGRESS"
    with pytest.raises(errors.Unavailable):
        await runtime.release("sessions/s1", delete_transcript=True, token="")


async def test_ledger_failures_arrive_as_domain_errors(channel: grpc.aio.Channel) -> None:
    ledger = IdentityLedger(channel, None)
    with pytest.raises(errors.ResourceExhausted) as exhausted:
        await ledger.reserve(organization="organizations/acme", user="u", request_id="r", token="")
    assert exhausted.value.reason == "QUOTA_EXCEEDED"
    with pytest.raises(errors.NotFound) as missing:
        await ledger.settle("organizations/acme/usageReservations/r1", Usage(), token="")
    assert missing.value.reason == "RESERVATION_NOT_FOUND"
    with pytest.raises(errors.Unavailable):
        await ledger.release("organizations/acme/usageReservations/r1", token="")


class RecordingRuntime(runtime_rpc.RuntimeServiceServicer):
    """Answers every call and remembers the bearer token each one carried."""

    def __init__(self) -> None:
        self.tokens: list[str] = []

    def _seen(self, context: Any) -> None:
        metadata = dict(context.invocation_metadata())
        self.tokens.append(str(metadata.get("authorization", "")))

    async def RunTurn(self, request: Any, context: Any) -> AsyncIterator[Any]:  # type: ignore[override]
        self._seen(context)
        yield runtime_pb.RunTurnResponse(event=rt.RuntimeEvent(turn_id=request.turn_id))

    async def InterruptTurn(self, request: Any, context: Any) -> Any:
        self._seen(context)
        return runtime_pb.InterruptTurnResponse()

    async def SubmitPermissionDecision(self, request: Any, context: Any) -> Any:
        self._seen(context)
        return runtime_pb.SubmitPermissionDecisionResponse()

    async def ReleaseSession(self, request: Any, context: Any) -> Any:
        self._seen(context)
        return runtime_pb.ReleaseSessionResponse()


async def test_the_runtime_is_called_as_the_service_never_with_the_users_token() -> None:
    recording = RecordingRuntime()
    server = grpc.aio.server()
    runtime_rpc.add_RuntimeServiceServicer_to_server(recording, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    async def exchange() -> tuple[str, float]:
        return "service-token", time.time() + 900

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            runtime = GrpcRuntime(channel, CachedToken(exchange))
            request = TurnRequest(
                "sessions/s1",
                "t1",
                "organizations/acme",
                "organizations/acme/users/u",
                "workspaces/s1",
                runtime_options.AgentOptions(),
                "hi",
                "",
                False,
            )
            assert len([e async for e in runtime.run_turn(request, token="user-token")]) == 1
            await runtime.interrupt("sessions/s1", "t1", token="user-token")
            await runtime.decide(
                "sessions/s1",
                "t1",
                "p1",
                allow=True,
                message="",
                updated_input=None,
                decided_by="organizations/acme/users/u",
                token="user-token",
            )
            await runtime.release("sessions/s1", delete_transcript=False, token="user-token")
    finally:
        await server.stop(0)
    assert recording.tokens == ["Bearer service-token"] * 4
