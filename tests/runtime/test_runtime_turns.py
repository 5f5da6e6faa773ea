"""RunTurn end to end: a real RuntimeService, the real SDK and CLI, the offline model.

What a caller sees: events in order, text deltas that add up to the text, tools that really run
in the session's workspace with only the allowed environment, MCP tools, failures reported as a
failed turn_result (never a broken stream), and the errors that refuse a turn before it starts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
import pytest

from corral.runtime.v1 import agent_options_pb2 as options_pb
from corral.runtime.v1 import runtime_event_pb2 as event_pb
from corral.runtime.v1 import runtime_service_pb2 as pb
from tests.runtime.conftest import (
    Runtime,
    directive,
    new_session,
    options,
    payloads,
    recorded_model_requests,
)
from tests.support.grpc_tools import error_reason, free_port

MCP_SERVER = Path(__file__).with_name("mcp_calc_server.py")
ALLOW = options_pb.PermissionRule.ACTION_ALLOW


def result_of(events: list[event_pb.RuntimeEvent]) -> event_pb.TurnResult:
    assert events[-1].HasField("turn_result"), payloads(events)
    return events[-1].turn_result


async def test_text_streams_in_order_and_the_deltas_make_the_text(runtime: Runtime) -> None:
    text = "The quick brown fox jumps over the lazy dog, in small pieces."
    events = await runtime.turn(new_session(), directive({"text": text, "chunk": 7}))

    assert [e.ordinal for e in events] == list(range(1, len(events) + 1))
    assert {e.turn_id for e in events} == {"turn-1"}
    kinds = payloads(events)
    assert kinds[0] == "turn_started"
    assert kinds[-1] == "turn_result"
    started = events[0].turn_started
    assert started.process_started
    assert started.transcript_id
    assert "Bash" in started.tools
    deltas = [e.text_delta for e in events if e.HasField("text_delta")]
    assert len(deltas) == -(-len(text) // 7)
    assert "".join(d.text for d in deltas) == text
    block = next(e.text_block for e in events if e.HasField("text_block"))
    assert block.text == text
    assert block.message_id == deltas[0].message_id
    assert kinds.index("text_block") > max(i for i, k in enumerate(kinds) if k == "text_delta")
    result = result_of(events)
    assert result.status == event_pb.TurnResult.STATUS_SUCCEEDED
    assert result.result == text
    assert result.transcript_id == started.transcript_id
    assert result.usage.input_tokens > 0
    assert result.usage.cost_usd_micros > 0


async def test_a_second_turn_reuses_the_warm_process_and_costs_only_itself(
    runtime: Runtime,
) -> None:
    session = new_session()
    first = await runtime.turn(
        session, directive({"usage": {"input_tokens": 1000000}}, {"text": "a"})
    )
    transcript = result_of(first).transcript_id
    second = await runtime.turn(
        session, directive({"usage": {"input_tokens": 2000000}}, {"text": "b"}), resume=transcript
    )
    assert not second[0].turn_started.process_started
    assert second[0].turn_started.transcript_id == transcript
    # claude-sonnet-4-5 input: 3 USD per million tokens; the SDK's total is cumulative.
    assert result_of(first).usage.cost_usd_micros == pytest.approx(3_000_000, rel=0.01)
    assert result_of(second).usage.cost_usd_micros == pytest.approx(6_000_000, rel=0.01)


async def test_bash_runs_in_the_workspace_with_only_the_allowed_environment(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_TEST_SERVICE_SECRET", "must-not-leak")
    session = new_session()
    command = "pwd > where.txt && env > env.txt && echo made > made.txt"
    events = await runtime.turn(
        session,
        directive({"tool": "Bash", "input": {"command": command}}, {"text": "done"}),
        agent=options(allowed_tools=["Bash"], env={"GREETING": "hello-agent"}),
    )

    tool = next(e.tool_use for e in events if e.HasField("tool_use"))
    assert tool.name == "Bash"
    assert tool.input["command"] == command
    assert not tool.mcp_server
    tool_result = next(e.tool_result for e in events if e.HasField("tool_result"))
    assert tool_result.tool_use_id == tool.id
    assert not tool_result.is_error
    assert result_of(events).status == event_pb.TurnResult.STATUS_SUCCEEDED
    workspace = runtime.workspace(session)
    assert (workspace / "made.txt").read_text() == "made\n"
    assert (workspace / "where.txt").read_text().strip() == str(workspace)
    env = (workspace / "env.txt").read_text()
    assert "GREETING=hello-agent" in env
    assert "CORRAL_TEST_SERVICE_SECRET" not in env
    assert f"HOME={runtime.root / 'sessions' / session}" in env


async def test_an_mcp_stdio_server_tool_is_called(runtime: Runtime) -> None:
    calc = options_pb.McpServer(
        name="calc",
        stdio=options_pb.McpStdioTransport(command=sys.executable, args=[str(MCP_SERVER)]),
    )
    nowhere = options_pb.McpServer(  # an HTTP server nobody runs: reported, not fatal
        name="nowhere",
        http=options_pb.McpHttpTransport(
            url=f"http://127.0.0.1:{free_port()}/mcp", headers={"authorization": "Bearer s3cret"}
        ),
    )
    agent = options(
        mcp_servers=[calc, nowhere],
        permission_rules=[options_pb.PermissionRule(tool_pattern="mcp__calc__*", action=ALLOW)],
    )
    events = await runtime.turn(
        new_session(),
        directive({"tool": "mcp__calc__add", "input": {"a": 20, "b": 22}}, {"text": "added"}),
        agent=agent,
    )

    statuses = {s.name: s.status for s in events[0].turn_started.mcp_servers}
    assert statuses == {"calc": "connected", "nowhere": "failed"}
    problem = next(e.error for e in events if e.HasField("error"))
    assert problem.reason == "MCP_SERVER_FAILED"
    assert "nowhere" in problem.message
    tool = next(e.tool_use for e in events if e.HasField("tool_use"))
    assert tool.name == "mcp__calc__add"
    assert tool.mcp_server == "calc"
    decision = next(e.permission_decision for e in events if e.HasField("permission_decision"))
    assert decision.source == event_pb.PermissionDecision.SOURCE_POLICY
    tool_result = next(e.tool_result for e in events if e.HasField("tool_result"))
    assert not tool_result.is_error
    assert "sum=42" in tool_result.content
    assert result_of(events).status == event_pb.TurnResult.STATUS_SUCCEEDED


async def test_a_model_failure_ends_the_turn_failed_not_the_stream(runtime: Runtime) -> None:
    events = await runtime.turn(
        new_session(),
        directive({"error": {"status": 400, "message": "scripted failure", "retry": False}}),
    )
    result = result_of(events)
    assert payloads(events)[0] == "turn_started"
    assert result.status == event_pb.TurnResult.STATUS_FAILED
    assert result.error.reason == "MODEL_ERROR"
    assert "scripted failure" in result.error.message


async def test_max_turns_is_reported(runtime: Runtime) -> None:
    steps = [{"tool": "Bash", "input": {"command": f"echo {i}"}} for i in range(3)]
    events = await runtime.turn(
        new_session(), directive(*steps), agent=options(max_turns=1, allowed_tools=["Bash"])
    )
    assert result_of(events).status == event_pb.TurnResult.STATUS_MAX_TURNS_REACHED


async def test_turns_are_refused_before_they_start(runtime: Runtime) -> None:
    session = new_session()
    with pytest.raises(grpc.aio.AioRpcError) as missing_token:
        await runtime.stub.GetRuntimeStatus(pb.GetRuntimeStatusRequest())
    assert missing_token.value.code() == grpc.StatusCode.UNAUTHENTICATED

    bad = runtime.request(session, "hi")
    bad.workspace = "workspaces/../etc"
    bad.options.permission_rules.add(tool_pattern="", action=ALLOW)
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await runtime.stream(bad).read()
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # A person (here a user of the organization the request names) may not call the runtime.
    user = runtime.signing_key.token()
    with pytest.raises(grpc.aio.AioRpcError) as foreign:
        await runtime.stream(runtime.request(session, "hi"), token=user).read()
    assert foreign.value.code() == grpc.StatusCode.PERMISSION_DENIED

    missing = runtime.request(session, "hi", resume="5b1c1d9e-0000-4000-8000-000000000000")
    with pytest.raises(grpc.aio.AioRpcError) as no_transcript:
        await runtime.stream(missing).read()
    assert no_transcript.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(no_transcript.value) == "TRANSCRIPT_NOT_FOUND"


async def test_a_missing_workspace_is_refused_without_the_servers_paths(
    runtime: Runtime,
) -> None:
    session = new_session()
    request = runtime.request(session, "hi")
    runtime.workspace(session).rmdir()  # storage deleted it (or never made it)
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await runtime.stream(request).read()
    assert gone.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(gone.value) == "WORKSPACE_UNAVAILABLE"
    message = gone.value.details() or ""
    assert session in message
    assert str(runtime.workspaces) not in message and "/" not in message


async def test_another_organizations_session_is_not_found(runtime: Runtime) -> None:
    session = new_session()
    await runtime.turn(session, "hello")
    # The session is bound to acme: a request naming another organization finds nothing.
    request = runtime.request(session, "hi", organization="organizations/globex")
    with pytest.raises(grpc.aio.AioRpcError) as hidden:
        await runtime.stream(request).read()
    assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
    # Another organization's people (and a superuser, a person too) cannot reach it at all.
    globex = runtime.signing_key.token(
        sub="organizations/globex/users/mallory", org="organizations/globex", roles=["admin"]
    )
    root = runtime.signing_key.token(
        sub="users/root", org="organizations/corral", roles=["superuser"]
    )
    for token in (globex, root):
        with pytest.raises(grpc.aio.AioRpcError) as release:
            await runtime.stub.ReleaseSession(
                pb.ReleaseSessionRequest(session=f"sessions/{session}", delete_transcript=True),
                metadata=runtime.metadata(token),
            )
        assert release.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # The session service may release it.
    reply = await runtime.stub.ReleaseSession(
        pb.ReleaseSessionRequest(session=f"sessions/{session}"), metadata=runtime.metadata()
    )
    assert reply.process_released


async def test_the_budget_caps_each_turn_not_the_session(runtime: Runtime) -> None:
    session, budget = new_session(), options(max_budget_usd_micros=1_000_000)
    pricey = directive({"usage": {"input_tokens": 200_000}}, {"text": "0.60 USD"})
    transcript = ""
    for _ in range(2):  # 0.60 USD each: both fit a 1 USD budget, though together they do not
        events = await runtime.turn(session, pricey, resume=transcript, agent=budget)
        result = result_of(events)
        assert result.status == event_pb.TurnResult.STATUS_SUCCEEDED
        assert result.usage.cost_usd_micros == pytest.approx(600_000, rel=0.01)
        transcript = result.transcript_id
    too_much = directive({"usage": {"input_tokens": 1_000_000}}, {"text": "3 USD"})
    events = await runtime.turn(session, too_much, resume=transcript, agent=budget)
    result = result_of(events)
    assert result.status == event_pb.TurnResult.STATUS_BUDGET_EXCEEDED
    assert result.usage.cost_usd_micros == pytest.approx(3_000_000, rel=0.01)


async def test_thinking_streams_as_deltas_then_a_block(runtime: Runtime) -> None:
    events = await runtime.turn(
        new_session(),
        directive({"thinking": "let me think about it", "chunk": 6}, {"text": "answer"}),
        agent=options(max_thinking_tokens=2048),
    )
    deltas = [e.thinking_delta.thinking for e in events if e.HasField("thinking_delta")]
    block = next(e.thinking_block for e in events if e.HasField("thinking_block"))
    assert "".join(deltas) == block.thinking == "let me think about it"
    text = next(e.text_block for e in events if e.HasField("text_block"))
    assert text.index > block.index
    assert result_of(events).status == event_pb.TurnResult.STATUS_SUCCEEDED


async def test_a_forked_session_continues_its_parents_conversation(runtime: Runtime) -> None:
    parent, child = new_session(), new_session()
    write = directive({"tool": "Bash", "input": {"command": "echo jam > pantry.txt"}})
    events = await runtime.turn(
        parent, f"the parent says marmalade {write}", agent=options(allowed_tools=["Bash"])
    )
    original = result_of(events).transcript_id
    with recorded_model_requests() as bodies:
        request = runtime.request(child, "the fork speaks", resume=original)
        request.fork_transcript = True
        events = [response.event async for response in runtime.stream(request)]
    forked = result_of(events)
    assert forked.status == event_pb.TurnResult.STATUS_SUCCEEDED
    assert forked.transcript_id != original
    assert events[0].turn_started.transcript_id == forked.transcript_id
    assert any(b"marmalade" in body for body in bodies), "the parent's history is missing"
    assert 0 < forked.usage.cost_usd_micros < 1_000_000  # the fork's own turn, not the parent's
    # The fork's files are storage's to copy (ForkSession does): the runtime leaves them alone.
    assert (runtime.workspace(parent) / "pantry.txt").read_text() == "jam\n"
    assert list(runtime.workspace(child).iterdir()) == []

    # The parent goes on, unaffected; another organization cannot fork it.
    again = await runtime.turn(parent, "still the parent", resume=original)
    assert result_of(again).transcript_id == original
    stolen = runtime.request(
        new_session(), "mine now", resume=original, organization="organizations/globex"
    )
    stolen.fork_transcript = True
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await runtime.stream(stolen).read()
    assert error_reason(refused.value) == "TRANSCRIPT_NOT_FOUND"
