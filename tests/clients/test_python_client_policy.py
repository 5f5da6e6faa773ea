"""corral.client's call policy against a real gRPC server that misbehaves on purpose: retries on
UNAVAILABLE only for calls that are safe to repeat, one token renewal when the server says the
token expired (and a renewal ahead of expiry), errors raised as ApiError subclasses with the
ErrorInfo reason and the request id, and an event stream resumed by sequence after a drop."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from corral.client import Client, NotFound, RetryPolicy, Unauthenticated, Unavailable
from corral.identity.v1 import identity_service_pb2 as ipb
from corral.identity.v1 import identity_service_pb2_grpc as irpc
from corral.libs import errors
from corral.libs.grpc.server import CorralServer, ServerConfig, ServiceRegistration
from corral.session.v1 import event_pb2, session_pb2
from corral.session.v1 import session_service_pb2 as spb
from corral.session.v1 import session_service_pb2_grpc as srpc

FAST = RetryPolicy(attempts=4, initial_backoff=0.01, max_backoff=0.02)


@dataclass
class Script:
    """What the fake services do; every call is recorded as (method, authorization)."""

    unavailable: int = 0  # answer UNAVAILABLE to this many calls of each method first
    valid_tokens: set[str] = field(default_factory=lambda: {"t1"})
    calls: list[tuple[str, str]] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)
    refreshes: list[str] = field(default_factory=list)
    streams: list[int] = field(default_factory=list)  # after_sequence of each stream opened
    renewals_valid: bool = True  # whether a renewed token is accepted

    def enter(self, method: str, context: Any) -> None:
        auth = dict(context.invocation_metadata()).get("authorization", "")
        self.calls.append((method, auth))
        self.attempts[method] = self.attempts.get(method, 0) + 1
        if self.attempts[method] <= self.unavailable:
            raise errors.Unavailable("not now", reason="DEPENDENCY_FAILED", retry_after_seconds=0)
        if auth.removeprefix("Bearer ") not in self.valid_tokens:
            raise errors.Unauthenticated("token expired", reason="TOKEN_EXPIRED")


class Sessions(srpc.SessionServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    async def GetSession(self, request: spb.GetSessionRequest, context: Any) -> Any:
        self.script.enter("GetSession", context)
        if request.name != "sessions/s1":
            raise errors.NotFound(f"no {request.name}", reason="SESSION_NOT_FOUND")
        return spb.GetSessionResponse(session=session_pb2.Session(name="sessions/s1"))

    async def SendMessage(self, request: spb.SendMessageRequest, context: Any) -> Any:
        self.script.enter("SendMessage", context)
        return spb.SendMessageResponse()

    async def InterruptTurn(self, request: spb.InterruptTurnRequest, context: Any) -> Any:
        self.script.enter("InterruptTurn", context)
        return spb.InterruptTurnResponse()

    async def StreamSessionEvents(
        self, request: spb.StreamSessionEventsRequest, context: Any
    ) -> AsyncIterator[spb.StreamSessionEventsResponse]:
        self.script.enter("StreamSessionEvents", context)
        self.script.streams.append(request.after_sequence)
        after = request.after_sequence

        def event(sequence: int, **payload: Any) -> spb.StreamSessionEventsResponse:
            return spb.StreamSessionEventsResponse(
                event=event_pb2.SessionEvent(session=request.session, sequence=sequence, **payload)
            )

        if len(self.script.streams) == 1:  # first connection: 1..3, then the server goes away
            for sequence in range(after + 1, 4):
                yield event(sequence, text_delta=event_pb2.TextDelta(text=str(sequence)))
            raise errors.Unavailable("draining", reason="STREAM_RESTART")
        # A reconnect: one event it already had (it must not repeat), a heartbeat, then 4..5.
        yield event(3, text_delta=event_pb2.TextDelta(text="3"))
        yield event(0, heartbeat=event_pb2.Heartbeat())
        for sequence in range(max(after, 3) + 1, 6):
            yield event(sequence, text_delta=event_pb2.TextDelta(text=str(sequence)))


class Identity(irpc.IdentityServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    async def Login(self, request: ipb.LoginRequest, context: Any) -> Any:
        return ipb.LoginResponse(token=grant("t1", "r1", expires_in=900))

    async def RefreshToken(self, request: ipb.RefreshTokenRequest, context: Any) -> Any:
        auth = dict(context.invocation_metadata()).get("authorization", "")
        assert not auth, "a refresh must not carry the (expired) access token"
        self.script.refreshes.append(request.refresh_token)
        number = len(self.script.refreshes) + 1
        if self.script.renewals_valid:
            self.script.valid_tokens = {f"t{number}"}
        return ipb.RefreshTokenResponse(token=grant(f"t{number}", f"r{number}", expires_in=900))


def grant(access: str, refresh: str, *, expires_in: float) -> ipb.TokenGrant:
    token = ipb.TokenGrant(access_token=access, refresh_token=refresh, token_type="Bearer")
    token.access_token_expire_time.FromNanoseconds(int((time.time() + expires_in) * 1e9))
    return token


@pytest.fixture
async def served() -> AsyncIterator[tuple[Script, str]]:
    script = Script()
    sessions, identity = Sessions(script), Identity(script)
    server = CorralServer(
        ServerConfig(name="fake", tracing=False, metrics=False),
        [
            ServiceRegistration(
                "corral.session.v1.SessionService",
                lambda s: srpc.add_SessionServiceServicer_to_server(sessions, s),
            ),
            ServiceRegistration(
                "corral.identity.v1.IdentityService",
                lambda s: irpc.add_IdentityServiceServicer_to_server(identity, s),
            ),
        ],
    )
    await server.start()
    try:
        yield script, server.address
    finally:
        await server.stop(0)


async def test_safe_calls_are_retried_on_unavailable(served: tuple[Script, str]) -> None:
    script, address = served
    script.unavailable = 2
    async with Client(address, token="t1", retry=FAST) as corral:
        assert (await corral.get_session("sessions/s1")).name == "sessions/s1"  # a read
        await corral.send_message("sessions/s1", "hi")  # carries a request_id
        with pytest.raises(Unavailable) as caught:
            await corral.interrupt("sessions/s1")  # neither: it may have happened
    assert script.attempts == {"GetSession": 3, "SendMessage": 3, "InterruptTurn": 1}
    assert caught.value.reason == "DEPENDENCY_FAILED"


async def test_retries_give_up_after_the_policys_attempts(served: tuple[Script, str]) -> None:
    script, address = served
    script.unavailable = 10
    async with Client(address, token="t1", retry=FAST) as corral:
        with pytest.raises(Unavailable):
            await corral.get_session("sessions/s1")
    assert script.attempts["GetSession"] == FAST.attempts


async def test_errors_carry_the_error_info_reason_and_request_id(
    served: tuple[Script, str],
) -> None:
    _, address = served
    async with Client(address, token="t1") as corral:
        with pytest.raises(NotFound) as caught:
            await corral.get_session("sessions/nope")
    error = caught.value
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.reason == "SESSION_NOT_FOUND"
    assert "sessions/nope" in error.message
    assert error.request_id  # the kit's x-request-id trailer


async def test_an_expired_token_is_renewed_and_the_call_repeated(
    served: tuple[Script, str],
) -> None:
    script, address = served
    async with Client(address, retry=FAST) as corral:
        await corral.login("a@corral.test", "pw")
        script.valid_tokens = {"t-other"}  # the server now says t1 has expired
        assert (await corral.get_session("sessions/s1")).name == "sessions/s1"
        assert corral.tokens.access_token == "t2"
    assert script.refreshes == ["r1"]
    assert script.calls == [("GetSession", "Bearer t1"), ("GetSession", "Bearer t2")]


async def test_a_refused_renewal_is_raised_not_looped(served: tuple[Script, str]) -> None:
    script, address = served
    script.renewals_valid = False
    async with Client(address, retry=FAST) as corral:
        await corral.login("a@corral.test", "pw")
        script.valid_tokens = set()
        with pytest.raises(Unauthenticated) as caught:
            await corral.get_session("sessions/s1")
    assert caught.value.reason == "TOKEN_EXPIRED"
    assert script.refreshes == ["r1"]  # one renewal, then the error
    assert len(script.calls) == 2


async def test_a_token_about_to_expire_is_renewed_before_the_call(
    served: tuple[Script, str],
) -> None:
    script, address = served
    async with Client(address, retry=FAST) as corral:
        await corral.login("a@corral.test", "pw")
        corral.tokens.expires_at = time.time() + 5  # inside the renewal margin
        script.valid_tokens = {"t2"}
        await corral.get_session("sessions/s1")
    assert script.refreshes == ["r1"]
    assert [auth for method, auth in script.calls if method == "GetSession"] == ["Bearer t2"]


async def test_the_event_stream_resumes_by_sequence_after_a_drop(
    served: tuple[Script, str],
) -> None:
    script, address = served
    async with Client(address, token="t1", retry=FAST) as corral:
        events = [event async for event in corral.events("sessions/s1")]
    assert [e.sequence for e in events] == [1, 2, 3, 4, 5]  # no gap, no duplicate
    assert script.streams == [0, 3]  # reopened after the last sequence it saw
    assert all(e.HasField("text_delta") for e in events)  # heartbeats are not events
