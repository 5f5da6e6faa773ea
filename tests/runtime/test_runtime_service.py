"""The runtime's service layer with a scripted SDK (``fake_sdk``), wired by ``main.compose``:
the rules that are easier to see without a CLI process. How SDK messages become events, the
order in which permission rules decide, what an interrupt leaves behind, which idle process the
pool evicts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from claude_agent_sdk import PermissionResultAllow, PermissionResultDeny, ToolPermissionContext

from corral.libs.auth.caller import Caller
from corral.libs.errors import NotFound, ResourceExhausted
from corral.runtime.v1 import agent_options_pb2 as options_pb
from corral.runtime.v1 import runtime_event_pb2 as event_pb
from corral.services.runtime.claude import ClaudeSdk
from corral.services.runtime.domain import Behavior, Decision, DecisionSource, RuleAction
from corral.services.runtime.pool import AgentProcess, ProcessPool, Ticket
from corral.services.runtime.sdk import AgentSpec, RuleVerdict
from corral.services.runtime.service import RuntimeConfig, RuntimeService
from corral.services.runtime.store import SessionStore
from corral.services.runtime.turn import TurnRequest
from tests.runtime.conftest import ORG, Clock, Runtime, new_session, options, payloads
from tests.runtime.fake_sdk import FakeClient, FakeSdk, init, stream, text, tool_call

ALICE = Caller("organizations/acme/users/alice", ORG)
SUCCEEDED = event_pb.TurnResult.STATUS_SUCCEEDED
INTERRUPTED = event_pb.TurnResult.STATUS_INTERRUPTED
Rule = options_pb.PermissionRule


def turn_request(
    session: str, *, turn_id: str = "turn-1", resume: str = "", **agent: Any
) -> TurnRequest:
    return TurnRequest(
        session_id=session,
        turn_id=turn_id,
        organization=ORG,
        actor=ALICE.subject,
        workspace_id=session,
        prompt="go",
        options=options(**agent),
        resume_transcript_id=resume,
    )


async def fake_runtime(make_runtime: Callable[..., Any], sdk: FakeSdk, **settings: Any) -> Runtime:
    runtime: Runtime = await make_runtime(sdk=sdk, **settings)
    return runtime


def client_of(runtime: Runtime, index: int = -1) -> FakeClient:
    assert runtime.sdk is not None
    return runtime.sdk.clients[index]


async def collect(events: AsyncIterator[event_pb.RuntimeEvent]) -> list[event_pb.RuntimeEvent]:
    return [event async for event in events]


async def test_sdk_messages_become_ordered_events_and_a_turn_costs_only_itself(
    make_runtime: Callable[..., Any],
) -> None:
    async def script(agent: FakeClient, prompt: str) -> None:
        # A late message of an earlier turn comes before this prompt's init: it is skipped.
        agent.send(stream({"type": "message_start", "message": {"id": "late"}}))
        servers = [{"name": "calc", "status": "connected"}, {"name": "gh", "status": "failed"}]
        agent.send(init(agent.transcript_id, mcp_servers=servers))
        agent.send(*text(f"msg-{agent.turns}", ["Hel", "lo"]))
        agent.send(*tool_call(f"msg-{agent.turns}", "toolu_1", "mcp__calc__add", "3"))
        agent.send(stream({"type": "message_delta", "usage": {"output_tokens": 7}}))
        agent.finish(0.25)

    runtime = await fake_runtime(make_runtime, FakeSdk(script))
    service, session = runtime.service, runtime.new_session()
    events = await collect(service.run_turn(ALICE, turn_request(session)))

    assert payloads(events) == [
        "turn_started",
        "error",
        "text_delta",
        "text_delta",
        "text_block",
        "tool_use",
        "tool_result",
        "usage",
        "turn_result",
    ]
    assert [e.ordinal for e in events] == list(range(1, len(events) + 1))
    started, failed_server = events[0].turn_started, events[1].error
    client = client_of(runtime)
    assert started.transcript_id == client.transcript_id
    assert started.process_started
    assert list(started.tools) == ["Bash", "Write"]
    assert (failed_server.reason, "'gh'" in failed_server.message) == ("MCP_SERVER_FAILED", True)
    assert {e.text_delta.message_id for e in events[2:4]} == {"msg-1"}
    assert events[4].text_block.text == "Hello"
    assert (events[5].tool_use.name, events[5].tool_use.mcp_server) == ("mcp__calc__add", "calc")
    assert (events[6].tool_result.tool_use_id, events[6].tool_result.content) == ("toolu_1", "3")
    assert events[7].usage.output_tokens == 7
    result = events[-1].turn_result
    assert result.status == SUCCEEDED
    assert result.usage.cost_usd_micros == 250_000
    assert result.transcript_id == client.transcript_id

    # The next turn finds the process warm; the SDK's total is cumulative, the turn's cost not.
    again = await collect(
        service.run_turn(
            ALICE, turn_request(session, turn_id="turn-2", resume=result.transcript_id)
        )
    )
    assert not again[0].turn_started.process_started
    assert again[-1].turn_result.usage.cost_usd_micros == 250_000
    assert client.total_cost_usd == pytest.approx(0.5)
    assert runtime.sdk is not None and len(runtime.sdk.clients) == 1


async def test_permission_rules_decide_in_order_and_only_a_person_answers_an_ask(
    make_runtime: Callable[..., Any],
) -> None:
    verdicts: dict[str, RuleVerdict | None] = {}
    answers: list[Decision] = []

    async def script(agent: FakeClient, prompt: str) -> None:
        agent.send(init(agent.transcript_id))
        for tool in ("mcp__github__create_issue", "mcp__calc__add", "Bash", "Write"):
            verdicts[tool] = agent.gate.rule_for(tool)
        answers.append(
            await agent.gate.ask("mcp__github__create_issue", {"title": "x"}, "toolu_9", "asks")
        )
        agent.finish(0.0)

    runtime = await fake_runtime(make_runtime, FakeSdk(script))
    service, session = runtime.service, runtime.new_session()
    rules = [
        Rule(tool_pattern="mcp__github__*", action=Rule.ACTION_ASK),
        Rule(tool_pattern="mcp__*", action=Rule.ACTION_ALLOW),
        Rule(tool_pattern="Bash", action=Rule.ACTION_DENY),
    ]
    events = []
    async for event in service.run_turn(ALICE, turn_request(session, permission_rules=rules)):
        events.append(event)
        if event.HasField("permission_request"):
            asked = event.permission_request
            service.decide(
                ALICE,
                session,
                "turn-1",
                asked.id,
                Behavior.ALLOW,
                decided_by="",
                message="",
                updated_input={"title": "y"},
            )

    assert {tool: v and v.action for tool, v in verdicts.items()} == {
        "mcp__github__create_issue": RuleAction.ASK,
        "mcp__calc__add": RuleAction.ALLOW,
        "Bash": RuleAction.DENY,
        "Write": None,  # no rule: the SDK's permission mode decides
    }
    decisions = [e.permission_decision for e in events if e.HasField("permission_decision")]
    policy = event_pb.PermissionDecision.SOURCE_POLICY
    assert [(d.source, d.behavior) for d in decisions] == [
        (policy, event_pb.PERMISSION_BEHAVIOR_ALLOW),
        (policy, event_pb.PERMISSION_BEHAVIOR_DENY),
        (event_pb.PermissionDecision.SOURCE_USER, event_pb.PERMISSION_BEHAVIOR_ALLOW),
    ]
    assert decisions[-1].decided_by == ALICE.subject
    assert dict(decisions[-1].updated_input) == {"title": "y"}
    assert asked.tool_use_id == "toolu_9"
    assert answers[0].behavior is Behavior.ALLOW
    assert answers[0].updated_input == {"title": "y"}
    assert events[-1].turn_result.status == SUCCEEDED
    with pytest.raises(NotFound):  # the turn is over: nothing is pending any more
        service.decide(
            ALICE,
            session,
            "turn-1",
            asked.id,
            Behavior.DENY,
            decided_by="",
            message="",
            updated_input=None,
        )


async def test_the_claude_adapter_answers_the_sdk_as_the_gate_decided(tmp_path: Path) -> None:
    class Gate:
        def rule_for(self, tool_name: str) -> RuleVerdict | None:
            return RuleVerdict(RuleAction.DENY, "no Bash") if tool_name == "Bash" else None

        async def ask(
            self, tool_name: str, tool_input: dict[str, Any], tool_use_id: str, reason: str
        ) -> Decision:
            if tool_name == "Write":
                return Decision("p1", Behavior.ALLOW, DecisionSource.USER, updated_input={"a": 2})
            return Decision("p2", Behavior.DENY, DecisionSource.INTERRUPT, "stop")

    sdk = ClaudeSdk(tmp_path, {"ANTHROPIC_API_KEY": "k"}, scrub_tool_env=False)
    await sdk.start()
    spec = AgentSpec("s", options(), "m", tmp_path, tmp_path / "config", tag="t")
    built = sdk.options(spec, Gate())
    assert built.can_use_tool is not None and built.hooks is not None
    context = ToolPermissionContext(tool_use_id="toolu_1")
    allowed = await built.can_use_tool("Write", {"a": 1}, context)
    assert isinstance(allowed, PermissionResultAllow) and allowed.updated_input == {"a": 2}
    denied = await built.can_use_tool("Edit", {}, context)
    assert isinstance(denied, PermissionResultDeny) and denied.interrupt
    hook = built.hooks["PreToolUse"][0].hooks[0]
    said: Any = await hook({"tool_name": "Bash"}, None, {"signal": None})  # type: ignore[typeddict-item]
    assert said["hookSpecificOutput"]["permissionDecision"] == "deny"
    assert await hook({"tool_name": "Read"}, None, {"signal": None}) == {}  # type: ignore[typeddict-item]
    await sdk.close()


async def test_an_interrupt_denies_what_is_pending_and_keeps_the_process(
    make_runtime: Callable[..., Any],
) -> None:
    async def script(agent: FakeClient, prompt: str) -> None:
        agent.send(init(agent.transcript_id))
        if prompt == "ask":
            # The CLI stops at a denial that says "interrupt", whatever became of the SDK's
            # interrupt request (this one it ignores).
            agent.ignore_interrupts = True
            decision = await agent.gate.ask("Write", {"path": "x"}, "toolu_1", "write x?")
            assert decision.source is DecisionSource.INTERRUPT
            agent.finish(0.0, subtype="error_during_execution")
        else:
            agent.finish(0.01)

    # Within the grace, or the process is stopped (and the next turn would need a new one).
    runtime = await fake_runtime(make_runtime, FakeSdk(script), runtime_interrupt_grace_seconds=1.0)
    service, session = runtime.service, runtime.new_session()
    request = turn_request(session)
    events = []
    async for event in service.run_turn(
        ALICE, TurnRequest(**{**request.__dict__, "prompt": "ask"})
    ):
        events.append(event)
        if event.HasField("permission_request"):
            assert service.status().pending_permission_requests == 1
            await service.interrupt(ALICE, session, "turn-1")

    asked = next(e.permission_request for e in events if e.HasField("permission_request"))
    decided = [e.permission_decision for e in events if e.HasField("permission_decision")]
    assert [(d.permission_request_id, d.source) for d in decided] == [
        (asked.id, event_pb.PermissionDecision.SOURCE_INTERRUPT)
    ]
    result = events[-1].turn_result
    assert (result.status, result.error.reason) == (INTERRUPTED, "INTERRUPTED")
    assert client_of(runtime).interrupts == 1
    with pytest.raises(NotFound) as gone:
        await service.interrupt(ALICE, session, "turn-1")
    assert gone.value.reason == "TURN_NOT_FOUND"
    status = service.status()
    assert (status.running_turns, status.pending_permission_requests) == (0, 0)
    # The agent wrapped up when asked: its process stays warm for the session's next turn.
    after = await collect(
        service.run_turn(
            ALICE, turn_request(session, turn_id="turn-2", resume=result.transcript_id)
        )
    )
    assert not after[0].turn_started.process_started
    assert after[-1].turn_result.status == SUCCEEDED


async def test_a_turn_ends_and_frees_its_session_when_cleaning_up_fails(
    make_runtime: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Surveying what an interrupted turn left running can fail (/proc races): the turn still
    ends with its result, its process is stopped, and the session takes the next turn."""

    async def script(agent: FakeClient, prompt: str) -> None:
        agent.send(init(agent.transcript_id))
        if prompt == "ask":
            agent.ignore_interrupts = True
            await agent.gate.ask("Write", {"path": "x"}, "toolu_1", "write x?")
            agent.finish(0.0, subtype="error_during_execution")
        else:
            agent.finish(0.01)

    async def broken_survey(self: AgentProcess) -> set[Any]:
        raise OSError("/proc vanished under us")

    runtime = await fake_runtime(make_runtime, FakeSdk(script), runtime_interrupt_grace_seconds=1.0)
    service, session = runtime.service, runtime.new_session()
    request = TurnRequest(**{**turn_request(session).__dict__, "prompt": "ask"})
    events = []
    async with asyncio.timeout(20):  # before the fix the stream never ended
        async for event in service.run_turn(ALICE, request):
            events.append(event)
            if event.HasField("permission_request"):
                monkeypatch.setattr(AgentProcess, "survey", broken_survey)
                await service.interrupt(ALICE, session, "turn-1")
    assert events[-1].turn_result.status == INTERRUPTED
    assert service.status().running_turns == 0
    monkeypatch.undo()
    after = await collect(service.run_turn(ALICE, turn_request(session, turn_id="turn-2")))
    assert after[0].turn_started.process_started  # the first process was stopped
    assert after[-1].turn_result.status == SUCCEEDED


async def test_an_agent_that_ignores_the_interrupt_is_stopped(
    make_runtime: Callable[..., Any],
) -> None:
    async def script(agent: FakeClient, prompt: str) -> None:
        agent.ignore_interrupts = True
        agent.send(init(agent.transcript_id))
        await asyncio.Event().wait()  # busy until the process is stopped

    runtime = await fake_runtime(
        make_runtime, FakeSdk(script), runtime_interrupt_grace_seconds=0.05
    )
    service, session = runtime.service, runtime.new_session()
    events = []
    async for event in service.run_turn(ALICE, turn_request(session)):
        events.append(event)
        if event.HasField("turn_started"):
            await service.interrupt(ALICE, session, "turn-1")

    result = events[-1].turn_result
    assert (result.status, result.error.reason) == (INTERRUPTED, "PROCESS_CRASHED")
    assert client_of(runtime).disconnected
    assert service.status().live_processes == 0


async def test_a_caller_that_goes_away_stops_the_turn_and_its_process(
    make_runtime: Callable[..., Any],
) -> None:
    async def script(agent: FakeClient, prompt: str) -> None:
        agent.send(init(agent.transcript_id))
        await asyncio.Event().wait()

    runtime = await fake_runtime(make_runtime, FakeSdk(script))
    service, session = runtime.service, runtime.new_session()
    events = service.run_turn(ALICE, turn_request(session))
    first = await anext(events)
    assert first.HasField("turn_started")
    state = service.store.loaded(session)
    assert state is not None and state.turn is not None and state.turn.task is not None
    task = state.turn.task
    await events.aclose()  # what grpc does when the caller cancels
    await task

    client = client_of(runtime)
    assert (client.interrupts, client.disconnected) == (1, True)
    assert (service.status().running_turns, service.status().live_processes) == (0, 0)


async def test_the_pool_evicts_the_least_recently_used_idle_process(tmp_path: Path) -> None:
    clock, sdk = Clock(), FakeSdk()
    await sdk.start()
    pool = ProcessPool(2, idle_seconds=60, clock=clock, max_waiting=1)

    def connect(session: str) -> Callable[[], Any]:
        spec = AgentSpec(session, options(), "m", tmp_path, tmp_path, tag=f"tag-{session}")

        async def start() -> FakeClient:
            return await sdk.connect(spec, gate=None)  # type: ignore[arg-type]

        return start

    async def start(ticket: Ticket) -> AgentProcess:
        session = ticket.session_id
        return await pool.start(ticket, "k", f"tag-{session}", connect(session))

    a = await start(pool.reserve("a"))
    clock.now = 1
    b = await start(pool.reserve("b"))
    pool.checkin(a)
    clock.now = 2
    pool.checkin(b)
    clock.now = 3
    assert pool.take_warm("a", "k") is a  # a is used again: b is now the least recent
    assert pool.take_warm("b", "other options") is None
    pool.checkin(a)

    c = await start(pool.reserve("c"))
    stopped = [client.spec.session_id for client in sdk.clients if client.disconnected]
    assert stopped == ["b"]
    assert (pool.has_process("a"), pool.has_process("b"), pool.live) == (True, False, 2)

    assert pool.take_warm("a", "k") is a  # both busy now: a third session waits its turn
    d = pool.reserve("d")
    assert (d.waiting, d.position, pool.waiting) == (True, 1, 1)
    with pytest.raises(ResourceExhausted) as full:  # and the queue holds one
        pool.reserve("e")
    assert full.value.reason == "POOL_EXHAUSTED"
    assert pool.exhausted == 1

    clock.now = 4
    pool.checkin(a)  # a's process goes to d, which waited: the next turn of a must wait too
    assert not d.waiting and d.victim is a and not pool.has_process("a")
    assert pool.live == 2
    await start(d)
    assert client_of_session(sdk, "a").disconnected
    assert pool.take_warm("a", "k") is None

    pool.checkin(c)
    clock.now = 4 + 60
    assert await pool.reap() == 0  # idle for exactly idle_seconds: not yet
    clock.now += 1
    assert await pool.reap() == 1
    assert pool.live == 1


def client_of_session(sdk: FakeSdk, session: str) -> FakeClient:
    return next(c for c in sdk.clients if c.spec.session_id == session)


async def test_names_use_the_shared_alphabet_and_options_may_merge_a_policy(
    make_runtime: Callable[..., Any],
) -> None:
    runtime = await fake_runtime(make_runtime, FakeSdk())
    dotted = runtime.request("s.1", "hi")
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await runtime.stream(dotted).read()
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    def servers(count: int) -> list[options_pb.McpServer]:
        return [
            options_pb.McpServer(name=f"srv-{i}", http=options_pb.McpHttpTransport(url="http://x"))
            for i in range(count)
        ]

    # An organisation's policy brings up to 20 servers, the session up to 20 of its own.
    merged = await runtime.turn(new_session(), "hi", agent=options(mcp_servers=servers(40)))
    assert merged[-1].turn_result.status == SUCCEEDED
    assert len(client_of(runtime).spec.options.mcp_servers) == 40
    with pytest.raises(grpc.aio.AioRpcError) as too_many:
        await runtime.turn(new_session(), "hi", agent=options(mcp_servers=servers(41)))
    assert too_many.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_the_service_touches_no_disk_until_it_is_started(tmp_path: Path) -> None:
    sdk, root = FakeSdk(), tmp_path / "runtime"
    config = RuntimeConfig(
        pool_size=1,
        idle_seconds=60,
        default_model="m",
        permission_timeout_seconds=1,
        interrupt_grace_seconds=1,
    )
    workspaces = tmp_path / "storage" / "workspaces"
    service = RuntimeService(config, sdk, SessionStore(root, workspaces), ProcessPool(1, 60))
    assert not root.exists() and not sdk.started
    await service.start()
    assert (root / "sessions").is_dir() and (root / "state").is_dir() and sdk.started
    assert not workspaces.exists()  # storage's to make
