"""A person's view of a live agent, end to end: identity, session and runtime services over
gRPC, the real Claude Agent SDK and CLI, the offline model scripted from the prompt."""

from __future__ import annotations

import asyncio
import sys
import uuid
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from corral.identity.v1 import identity_service_pb2 as ipb
from corral.identity.v1 import quota_pb2
from corral.session.v1 import agent_options_pb2 as opts
from corral.session.v1 import event_pb2, permission_pb2, session_pb2
from corral.session.v1 import session_service_pb2 as pb
from corral.session.v1 import session_service_pb2_grpc as srpc
from tests.e2e.conftest import Platform, directive
from tests.runtime.conftest import processes_with
from tests.support.platform import MCP_SERVER, allow_mcp_commands, until_turn_over

Event = event_pb2.SessionEvent


async def new_session(platform: Platform, **options: Any) -> str:
    reply = await platform.sessions.CreateSession(
        pb.CreateSessionRequest(
            session=session_pb2.Session(
                display_name="e2e", agent_options=opts.AgentOptions(**options)
            )
        ),
        metadata=platform.auth,
    )
    return str(reply.session.name)


async def say(platform: Platform, session: str, text: str, **kw: Any) -> pb.SendMessageResponse:
    return await platform.sessions.SendMessage(
        pb.SendMessageRequest(session=session, text=text, request_id=str(uuid.uuid4()), **kw),
        metadata=platform.auth,
    )


async def events_until(
    platform: Platform,
    session: str,
    kind: str = "turn_result",
    *,
    count: int = 1,
    after: int = 0,
    within: float = 60.0,
) -> list[Event]:
    seen: list[Event] = []
    call = platform.sessions.StreamSessionEvents(
        pb.StreamSessionEventsRequest(session=session, after_sequence=after), metadata=platform.auth
    )
    async with asyncio.timeout(within):
        async for response in call:
            if response.event.HasField("heartbeat"):
                continue
            seen.append(response.event)
            if sum(1 for e in seen if e.WhichOneof("payload") == kind) >= count:
                call.cancel()
                return seen
    raise AssertionError("the stream ended")


async def say_when_allowed(platform: Platform, session: str, text: str) -> None:
    """Send ``text`` as soon as quotas allow (a finished turn gives its slot back just after
    its result event), within 30 s; any other refusal fails at once."""
    async with asyncio.timeout(30):
        while True:
            try:
                await say(platform, session, text)
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
            await asyncio.sleep(0.05)


def kinds(events: list[Event]) -> list[str]:
    return [e.WhichOneof("payload") or "" for e in events]


async def test_agent_answers_streams_runs_bash_and_calls_an_mcp_tool(platform: Platform) -> None:
    await allow_mcp_commands(platform, sys.executable)
    session = await new_session(
        platform,
        allowed_tools=["Bash", "mcp__calc__add"],
        mcp_servers=[
            opts.McpServer(
                name="calc",
                stdio=opts.McpStdioTransport(command=sys.executable, args=[str(MCP_SERVER)]),
            )
        ],
    )
    prompt = directive(
        {"tool": "Bash", "input": {"command": "echo hello-from-the-agent > out.txt"}},
        {"tool": "mcp__calc__add", "input": {"a": 2, "b": 40}},
        {"text": "All done: the file is written and 2 + 40 is 42.", "chunk": 5},
    )
    await say(platform, session, prompt)
    events = await events_until(platform, session)
    sequence = [e.sequence for e in events]
    assert sequence == list(range(1, len(events) + 1))
    tools = [e.tool_use.name for e in events if e.HasField("tool_use")]
    assert tools == ["Bash", "mcp__calc__add"]
    results = [e.tool_result for e in events if e.HasField("tool_result")]
    assert not any(r.is_error for r in results), results
    assert "sum=42" in results[1].content
    deltas = "".join(e.text_delta.text for e in events if e.HasField("text_delta"))
    assert "2 + 40 is 42" in deltas
    assert events[-1].turn_result.status == event_pb2.TurnResult.STATUS_SUCCEEDED
    assert (platform.workspace(session) / "out.txt").read_text().strip() == "hello-from-the-agent"
    await platform.sessions.DeleteSession(
        pb.DeleteSessionRequest(name=session), metadata=platform.auth
    )
    assert not platform.workspace(session).exists()  # the working directory goes with it


async def test_approval_is_asked_and_obeyed(platform: Platform) -> None:
    session = await new_session(
        platform,
        permission_rules=[
            opts.PermissionRule(tool_pattern="Bash", action=opts.PermissionRule.ACTION_ASK)
        ],
    )
    await say(
        platform,
        session,
        directive({"tool": "Bash", "input": {"command": "echo yes > allowed.txt"}}),
    )
    asked = await events_until(platform, session, "permission_request")
    request = asked[-1].permission_request
    assert request.tool_name == "Bash"
    state = (
        await platform.sessions.GetSession(
            pb.GetSessionRequest(name=session), metadata=platform.auth
        )
    ).session
    assert state.state == session_pb2.Session.STATE_AWAITING_PERMISSION
    await platform.sessions.RespondToPermission(
        pb.RespondToPermissionRequest(
            session=session,
            permission_request_id=request.id,
            decision=permission_pb2.PermissionDecision.DECISION_ALLOW,
        ),
        metadata=platform.auth,
    )
    events = await events_until(platform, session)
    assert (platform.workspace(session) / "allowed.txt").exists()
    assert [
        e.permission_decision.decision for e in events if e.HasField("permission_decision")
    ] == [permission_pb2.PermissionDecision.DECISION_ALLOW]

    await say(
        platform, session, directive({"tool": "Bash", "input": {"command": "echo no > denied.txt"}})
    )
    asked = await events_until(platform, session, "permission_request", count=2)
    await platform.sessions.RespondToPermission(
        pb.RespondToPermissionRequest(
            session=session,
            permission_request_id=asked[-1].permission_request.id,
            decision=permission_pb2.PermissionDecision.DECISION_DENY,
            message="not today",
        ),
        metadata=platform.auth,
    )
    events = await events_until(platform, session, count=2)
    second_turn = [e for e in events if e.turn_id == asked[-1].turn_id]
    denied = [e.tool_result for e in second_turn if e.HasField("tool_result")]
    assert denied and denied[0].is_error and "not today" in denied[0].content
    assert not (platform.workspace(session) / "denied.txt").exists()


async def test_interrupt_stops_a_long_tool_and_reports_what_it_cost(platform: Platform) -> None:
    session = await new_session(platform, allowed_tools=["Bash"])
    marker = f"corral-e2e-{uuid.uuid4().hex}"
    await say(
        platform,
        session,
        directive(
            {"usage": {"input_tokens": 1000, "output_tokens": 200}},
            {
                "tool": "Bash",
                "input": {"command": f"python3 -c 'import time; time.sleep(60)' {marker}"},
            },
        ),
    )
    await events_until(platform, session, "tool_use")
    for _ in range(200):
        if processes_with(marker):
            break
        await asyncio.sleep(0.05)
    assert processes_with(marker), "the tool never started"
    await platform.sessions.InterruptTurn(
        pb.InterruptTurnRequest(session=session), metadata=platform.auth
    )
    events = await events_until(platform, session)
    result = events[-1].turn_result
    assert result.status == event_pb2.TurnResult.STATUS_INTERRUPTED
    assert result.usage.cost_usd_micros > 0 and result.usage.input_tokens >= 1000
    for _ in range(100):
        if not processes_with(marker):
            break
        await asyncio.sleep(0.05)
    assert not processes_with(marker), "the interrupted tool is still running"


async def test_runtime_stopped_mid_turn_ends_the_turn_loses_nothing_and_the_next_turn_resumes(
    platform: Platform,
) -> None:
    session = await new_session(platform)
    await say(platform, session, "remember the word pineapple")
    first = await events_until(platform, session)
    assert first[-1].turn_result.status == event_pb2.TurnResult.STATUS_SUCCEEDED
    await say(platform, session, directive({"text": "thinking slowly", "chunk": 2, "delay": 0.3}))
    await events_until(platform, session, "text_delta", after=first[-1].sequence)
    await platform.restart("runtime")  # the runtime stops mid-turn, its CLI processes with it
    events = await events_until(platform, session, count=2)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))  # nothing lost
    # A stopping runtime drains: it interrupts its running turns and reports what they cost
    # (RuntimeApp.stop); a runtime that dies outright leaves the turn to fail when its lease
    # ends (tests/faults). Either way the turn is over, not left running.
    ended = events[-1].turn_result.status
    assert ended in (event_pb2.TurnResult.STATUS_INTERRUPTED, event_pb2.TurnResult.STATUS_FAILED)
    await until_turn_over(platform, session)
    await say(platform, session, "what word did I ask you to remember?")
    after = await events_until(platform, session, count=3)
    assert after[-1].turn_result.status == event_pb2.TurnResult.STATUS_SUCCEEDED
    session_now = (
        await platform.sessions.GetSession(
            pb.GetSessionRequest(name=session), metadata=platform.auth
        )
    ).session
    assert session_now.state == session_pb2.Session.STATE_IDLE and session_now.turn_count == 3


async def test_quota_exhaustion_stops_a_turn_before_it_starts(platform: Platform) -> None:
    await platform.identity.UpdateQuota(
        ipb.UpdateQuotaRequest(
            quota=quota_pb2.Quota(name="organizations/default/quota", max_concurrent_sessions=1),
            update_mask=field_mask_pb2.FieldMask(paths=["max_concurrent_sessions"]),
        ),
        metadata=platform.auth,
    )
    busy, other = await new_session(platform), await new_session(platform)
    await say(platform, busy, directive({"text": "a slow answer", "chunk": 1, "delay": 0.2}))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await say(platform, other, "hello")
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(refused.value)
    assert any(d.Is(error_details_pb2.QuotaFailure.DESCRIPTOR) for d in status.details)
    history = await platform.sessions.ListSessionEvents(
        pb.ListSessionEventsRequest(parent=other), metadata=platform.auth
    )
    assert list(history.session_events) == []
    await events_until(platform, busy)  # the running turn finishes and gives the slot back
    await say_when_allowed(platform, other, "now it fits")
    assert (await events_until(platform, other))[
        -1
    ].turn_result.status == event_pb2.TurnResult.STATUS_SUCCEEDED


async def test_organisation_policy_asks_even_when_the_session_allows(platform: Platform) -> None:
    from google.protobuf import field_mask_pb2 as masks

    from corral.session.v1 import agent_policy_pb2

    await platform.sessions.UpdateAgentPolicy(
        pb.UpdateAgentPolicyRequest(
            agent_policy=agent_policy_pb2.AgentPolicy(
                name="organizations/default/agentPolicy",
                permission_rules=[
                    opts.PermissionRule(tool_pattern="Bash", action=opts.PermissionRule.ACTION_ASK)
                ],
            ),
            update_mask=masks.FieldMask(paths=["permission_rules"]),
        ),
        metadata=platform.auth,
    )
    session = await new_session(platform, allowed_tools=["Bash"])
    await say(
        platform, session, directive({"tool": "Bash", "input": {"command": "echo x > x.txt"}})
    )
    asked = await events_until(platform, session, "permission_request")
    await platform.sessions.RespondToPermission(
        pb.RespondToPermissionRequest(
            session=session,
            permission_request_id=asked[-1].permission_request.id,
            decision=permission_pb2.PermissionDecision.DECISION_DENY,
        ),
        metadata=platform.auth,
    )
    await events_until(platform, session)
    assert not (platform.workspace(session) / "x.txt").exists()


async def test_a_session_change_reaches_identitys_audit_log_with_its_origin(
    platform: Platform,
) -> None:
    """Session audits each state change through its outbox to identity's log, with the
    request id, the client's address and user agent."""
    request_id = f"e2e-{uuid.uuid4().hex}"
    metadata = (*platform.auth, ("x-request-id", request_id), ("user-agent", "e2e-agent/1.0"))
    async with grpc.aio.insecure_channel(
        platform.settings.target_for("session"),
        options=[("grpc.primary_user_agent", "e2e-agent/1.0")],
    ) as channel:
        created = await srpc.SessionServiceStub(channel).CreateSession(
            pb.CreateSessionRequest(session=session_pb2.Session(display_name="audited")),
            metadata=metadata,
        )
    name = created.session.name
    async with asyncio.timeout(30):
        while True:
            listed = await platform.identity.ListAuditEvents(
                ipb.ListAuditEventsRequest(parent="organizations/default", page_size=1000),
                metadata=platform.auth,
            )
            found = [e for e in listed.audit_events if e.resource == name]
            if found:
                break
            await asyncio.sleep(0.05)
    (event,) = found
    assert event.service == "session" and event.request_id == request_id
    assert event.source_ip == "127.0.0.1"
    assert "e2e-agent/1.0" in event.user_agent
