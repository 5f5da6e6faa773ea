"""Every state change of a session is audited, with the call's request id, source address and
user agent, through an outbox that retries a failed write until identity has it; and a
session's queue holds at most 16 turns (RESOURCE_EXHAUSTED, QUEUE_FULL)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from corral.libs.audit import ORIGIN
from corral.services.session.api import SessionApi
from corral.services.session.domain import now
from corral.session.v1 import agent_policy_pb2, permission_pb2, session_pb2, turn_pb2
from corral.session.v1 import session_service_pb2 as pb
from corral.session.v1 import session_service_pb2_grpc as rpc
from tests.session.conftest import ACME, Stack
from tests.session.test_session_stream import collect, reason

ENQUEUE = pb.SendMessageRequest.BUSY_STRATEGY_ENQUEUE
AGENT = "corral-audit-test/1.0"
ALICE = "organizations/acme/users/alice"


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[rpc.SessionServiceStub]:
    """A client with its own user agent."""
    channel = grpc.aio.insecure_channel(stack.address, options=[("grpc.primary_user_agent", AGENT)])
    yield rpc.SessionServiceStub(channel)
    await channel.close()


class Calls:
    """Each call with its own x-request-id (and, optionally, a forwarded address)."""

    def __init__(self, stack: Stack, forwarded: str = "") -> None:
        self.stack, self.forwarded, self.ids = stack, forwarded, []

    def __call__(self, user: str = "alice", **kw: Any) -> tuple[tuple[str, str], ...]:
        self.ids.append(f"req-{len(self.ids)}")
        extra = (("x-forwarded-for", self.forwarded),) if self.forwarded else ()
        return (*self.stack.auth(user, **kw), ("x-request-id", self.ids[-1]), *extra)


async def test_every_state_change_is_audited_with_its_origin(
    stack: Stack, client: rpc.SessionServiceStub
) -> None:
    # Envoy (a trusted proxy: loopback by default) appended the client's real address last.
    meta = Calls(stack, forwarded="198.51.100.7, 203.0.113.9")
    await client.UpdateAgentPolicy(
        pb.UpdateAgentPolicyRequest(
            agent_policy=agent_policy_pb2.AgentPolicy(
                name=f"{ACME}/agentPolicy", allowed_models=["m"]
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["allowed_models"]),
        ),
        metadata=meta("ada", roles=("admin",)),
    )
    session = (
        await client.CreateSession(
            pb.CreateSessionRequest(session=session_pb2.Session()), metadata=meta()
        )
    ).session
    session = (
        await client.UpdateSession(
            pb.UpdateSessionRequest(
                session=session_pb2.Session(name=session.name, display_name="renamed"),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            ),
            metadata=meta(),
        )
    ).session
    await client.SendMessage(pb.SendMessageRequest(session=session.name, text="1"), metadata=meta())
    first = await stack.runtime.next_turn()
    first.emit(permission_request={"id": "p1", "tool_name": "Bash", "input": {"command": "ls"}})
    await collect(stack, session.name, until="permission_request")
    await client.RespondToPermission(
        pb.RespondToPermissionRequest(
            session=session.name,
            permission_request_id="p1",
            decision=permission_pb2.PermissionDecision.DECISION_ALLOW,
        ),
        metadata=meta(),
    )
    await client.InterruptTurn(pb.InterruptTurnRequest(session=session.name), metadata=meta())
    await collect(stack, session.name)
    await stack.ledger.wait_settled()
    fork = (
        await client.ForkSession(pb.ForkSessionRequest(name=session.name), metadata=meta())
    ).session
    await client.ArchiveSession(pb.ArchiveSessionRequest(name=session.name), metadata=meta())
    await client.DeleteSession(pb.DeleteSessionRequest(name=fork.name), metadata=meta())

    expected = [
        ("agent_policy.update", f"{ACME}/agentPolicy", "organizations/acme/users/ada"),
        ("session.create", session.name, ALICE),
        ("session.update", session.name, ALICE),
        ("session.send_message", f"{session.name}/turns/{first.id}", ALICE),
        ("permission.allow", session.name, ALICE),
        ("session.interrupt", f"{session.name}/turns/{first.id}", ALICE),
        ("session.fork", fork.name, ALICE),
        ("session.archive", session.name, ALICE),
        ("session.delete", fork.name, ALICE),
    ]
    for (action, resource, actor), request_id in zip(expected, meta.ids, strict=True):
        (record,) = await stack.audit.wait_for(action)
        assert (record["resource"], record["actor"], record["organization"]) == (
            resource,
            actor,
            ACME,
        ), action
        assert record["request_id"] == request_id, action
        assert record["source_ip"] == "203.0.113.9", action  # not what the client put first
        assert AGENT in record["user_agent"], action
    assert len(stack.audit.records) == len(expected)  # reads are not audited, nothing twice


async def test_a_forwarded_address_from_an_untrusted_peer_is_not_believed(stack: Stack) -> None:
    api = SessionApi(stack.service, trusted_proxies=[])  # nobody may name the client's address

    class Context:
        def invocation_metadata(self) -> Any:
            return (("x-forwarded-for", "203.0.113.9"), ("user-agent", AGENT))

        def trailing_metadata(self) -> Any:
            return (("x-request-id", "kit-made-id"),)

        def peer(self) -> str:
            return "ipv4:10.1.2.3:5555"

    api._origin(Context())
    origin = ORIGIN.get()
    assert origin is not None
    assert (origin.source_ip, origin.request_id, origin.user_agent) == (
        "10.1.2.3",
        "kit-made-id",
        AGENT,
    )


async def test_a_failed_audit_write_is_retried_until_identity_has_it(stack: Stack) -> None:
    stack.audit.fail = 3  # identity is down for three attempts
    created = (
        await stack.stub.CreateSession(
            pb.CreateSessionRequest(session=session_pb2.Session()),
            metadata=(*stack.auth(), ("x-request-id", "create-1")),
        )
    ).session  # the change is made whatever identity says
    await stack.service.outbox.settle()
    assert stack.audit.attempts == 1 and stack.audit.records == []

    # Another replica's retry loop, on a clock the test moves.
    moment = [now()]
    replica = stack.make_service(clock=lambda: moment[0])
    try:
        assert await replica.outbox.drain() == 0  # the backoff has not passed yet
        assert stack.audit.attempts == 1
        for hours in (1, 2):
            moment[0] = now() + timedelta(hours=hours)
            assert await replica.outbox.drain() == 0  # fails again
        assert stack.audit.attempts == 3 and stack.audit.records == []
        moment[0] = now() + timedelta(hours=3)
        assert await replica.outbox.drain() == 1  # identity is back
        moment[0] = now() + timedelta(hours=4)
        assert await replica.outbox.drain() == 0  # written once, never again
    finally:
        await replica.close()
    (record,) = stack.audit.records
    assert (record["action"], record["resource"], record["request_id"]) == (
        "session.create",
        created.name,
        "create-1",
    )
    assert stack.audit.attempts == 4
    assert stack.audit.tokens == [""]  # a retry goes as the service, not with a kept token


async def test_the_queue_holds_sixteen_turns(stack: Stack) -> None:
    session = (
        await stack.stub.CreateSession(
            pb.CreateSessionRequest(session=session_pb2.Session()), metadata=stack.auth()
        )
    ).session

    async def send(text: str) -> pb.SendMessageResponse:
        return await stack.stub.SendMessage(
            pb.SendMessageRequest(session=session.name, text=text, busy_strategy=ENQUEUE),
            metadata=stack.auth(),
        )

    await send("running")
    running = await stack.runtime.next_turn()
    for i in range(16):
        assert (await send(f"queued {i}")).turn.state == turn_pb2.Turn.STATE_QUEUED
    held = dict(stack.ledger.held)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await send("one too many")
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason(caught.value) == "QUEUE_FULL"
    assert stack.ledger.held == held  # nothing reserved for the refused turn
    running.finish()
    await stack.runtime.next_turn()  # the first queued turn runs: there is room for one
    assert (await send("room again")).turn.name


async def test_concurrent_sends_do_not_overfill_the_queue(stack: Stack) -> None:
    """Four sends at once with room for two: two queue, two get QUEUE_FULL (the count is
    taken again under the session's row lock, not only before it)."""
    session = (
        await stack.stub.CreateSession(
            pb.CreateSessionRequest(session=session_pb2.Session()), metadata=stack.auth()
        )
    ).session

    async def send(text: str) -> str:
        try:
            await stack.stub.SendMessage(
                pb.SendMessageRequest(session=session.name, text=text, busy_strategy=ENQUEUE),
                metadata=stack.auth(),
            )
        except grpc.aio.AioRpcError as error:
            return reason(error)
        return "OK"

    assert await send("running") == "OK"
    await stack.runtime.next_turn()
    for i in range(14):
        assert await send(f"queued {i}") == "OK"
    held = len(stack.ledger.held)
    answers = await asyncio.gather(*(send(f"racing {i}") for i in range(4)))
    assert sorted(answers) == ["OK", "OK", "QUEUE_FULL", "QUEUE_FULL"]
    listed = await stack.stub.ListTurns(
        pb.ListTurnsRequest(parent=session.name, page_size=100), metadata=stack.auth()
    )
    assert sum(t.state == turn_pb2.Turn.STATE_QUEUED for t in listed.turns) == 16
    assert len(stack.ledger.held) == held + 2  # the refused ones hold nothing
