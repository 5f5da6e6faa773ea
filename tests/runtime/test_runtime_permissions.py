"""Tool permission: policy rules, approval requests answered through SubmitPermissionDecision,
and the timeout whose outcome is always a denial."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from corral.runtime.v1 import agent_options_pb2 as options_pb
from corral.runtime.v1 import runtime_event_pb2 as event_pb
from corral.runtime.v1 import runtime_service_pb2 as pb
from tests.runtime.conftest import Runtime, directive, new_session, options
from tests.support.grpc_tools import error_reason

Rule = options_pb.PermissionRule
Source = event_pb.PermissionDecision
BYPASS = options_pb.AgentOptions.PERMISSION_MODE_BYPASS_PERMISSIONS


def write_file(name: str, *, pause: float = 0.0) -> str:
    """A turn that asks to write ``name``; ``pause`` keeps the turn running after the tool."""
    steps: list[dict[str, Any]] = [{"tool": "Bash", "input": {"command": f"echo yes > {name}"}}]
    if pause:
        steps.append({"delay": pause})
    return directive(*steps, {"text": "finished"})


class Turn:
    """One RunTurn call read event by event."""

    def __init__(self, runtime: Runtime, request: pb.RunTurnRequest) -> None:
        self.runtime = runtime
        self.request = request
        self.call = runtime.stream(request)
        self.events: list[event_pb.RuntimeEvent] = []

    async def until(self, payload: str) -> event_pb.RuntimeEvent:
        while True:
            response = await self.call.read()
            assert response is not grpc.aio.EOF, f"stream ended before {payload}"
            self.events.append(response.event)
            if response.event.HasField(payload):
                return response.event

    async def rest(self) -> list[event_pb.RuntimeEvent]:
        while (response := await self.call.read()) is not grpc.aio.EOF:
            self.events.append(response.event)
        return self.events

    def find(self, payload: str) -> list[Any]:
        return [getattr(e, payload) for e in self.events if e.HasField(payload)]

    async def decide(
        self, request_id: str, behavior: int, message: str = ""
    ) -> pb.SubmitPermissionDecisionResponse:
        response: pb.SubmitPermissionDecisionResponse = (
            await self.runtime.stub.SubmitPermissionDecision(
                pb.SubmitPermissionDecisionRequest(
                    session=self.request.session,
                    turn_id=self.request.turn_id,
                    permission_request_id=request_id,
                    behavior=behavior,  # type: ignore[arg-type]
                    decided_by="organizations/acme/users/alice",
                    message=message,
                ),
                metadata=self.runtime.metadata(),
            )
        )
        return response


async def test_the_sdk_asks_and_a_person_allows(runtime: Runtime) -> None:
    session = new_session()
    turn = Turn(runtime, runtime.request(session, write_file("allowed.txt", pause=1.0)))

    asked = (await turn.until("permission_request")).permission_request
    tool = turn.find("tool_use")[0]
    assert asked.tool_name == "Bash"
    assert asked.tool_use_id == tool.id
    assert asked.input["command"] == "echo yes > allowed.txt"
    assert asked.expire_time.seconds > 0
    status = (
        await runtime.stub.GetRuntimeStatus(
            pb.GetRuntimeStatusRequest(), metadata=runtime.metadata()
        )
    ).status
    assert status.pending_permission_requests == 1
    assert status.running_turns == 1

    reply = await turn.decide(asked.id, event_pb.PERMISSION_BEHAVIOR_ALLOW)
    assert reply.permission_decision.source == Source.SOURCE_USER
    await turn.until("tool_result")
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await turn.decide(asked.id, event_pb.PERMISSION_BEHAVIOR_DENY)
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(again.value) == "PERMISSION_REQUEST_NOT_PENDING"
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await turn.decide("perm-999", event_pb.PERMISSION_BEHAVIOR_ALLOW)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    await turn.rest()
    decided = turn.find("permission_decision")
    assert len(decided) == 1
    assert decided[0].permission_request_id == asked.id
    assert decided[0].behavior == event_pb.PERMISSION_BEHAVIOR_ALLOW
    assert decided[0].decided_by == "organizations/acme/users/alice"
    assert not turn.find("tool_result")[0].is_error
    assert (runtime.workspace(session) / "allowed.txt").read_text() == "yes\n"
    assert turn.find("turn_result")[0].status == event_pb.TurnResult.STATUS_SUCCEEDED


async def test_an_ask_rule_overrides_bypass_mode_and_a_person_denies(runtime: Runtime) -> None:
    session = new_session()
    agent = options(
        permission_mode=BYPASS, permission_rules=[Rule(tool_pattern="Ba*", action=Rule.ACTION_ASK)]
    )
    turn = Turn(runtime, runtime.request(session, write_file("denied.txt"), agent=agent))

    asked = (await turn.until("permission_request")).permission_request
    assert "Ba*" in asked.reason
    await turn.decide(asked.id, event_pb.PERMISSION_BEHAVIOR_DENY, message="not today")
    await turn.rest()

    decided = turn.find("permission_decision")[0]
    assert decided.behavior == event_pb.PERMISSION_BEHAVIOR_DENY
    assert decided.source == Source.SOURCE_USER
    assert decided.message == "not today"
    result = turn.find("tool_result")[0]
    assert result.is_error
    assert "not today" in result.content
    assert not (runtime.workspace(session) / "denied.txt").exists()
    assert turn.find("turn_result")[0].permission_denials == 1


async def test_an_unanswered_request_is_denied_when_it_times_out(runtime: Runtime) -> None:
    session = new_session()
    agent = options(permission_timeout=duration_pb2.Duration(nanos=400_000_000))
    turn = Turn(runtime, runtime.request(session, write_file("late.txt", pause=1.0), agent=agent))

    asked = (await turn.until("permission_request")).permission_request
    decided = (await turn.until("permission_decision")).permission_decision
    assert decided.permission_request_id == asked.id
    assert decided.behavior == event_pb.PERMISSION_BEHAVIOR_DENY
    assert decided.source == Source.SOURCE_TIMEOUT
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await turn.decide(asked.id, event_pb.PERMISSION_BEHAVIOR_ALLOW)
    assert error_reason(late.value) == "PERMISSION_REQUEST_NOT_PENDING"
    await turn.rest()
    assert turn.find("tool_result")[0].is_error
    assert not (runtime.workspace(session) / "late.txt").exists()


async def test_policy_rules_decide_in_order_without_asking(runtime: Runtime) -> None:
    session = new_session()
    agent = options(
        permission_mode=BYPASS,
        permission_rules=[
            Rule(tool_pattern="Bash", action=Rule.ACTION_DENY),
            Rule(tool_pattern="*", action=Rule.ACTION_ALLOW),
        ],
    )
    events = await runtime.turn(session, write_file("blocked.txt"), agent=agent)

    assert not any(e.HasField("permission_request") for e in events)
    decided = next(e.permission_decision for e in events if e.HasField("permission_decision"))
    assert decided.source == Source.SOURCE_POLICY
    assert decided.behavior == event_pb.PERMISSION_BEHAVIOR_DENY
    assert next(e.tool_result for e in events if e.HasField("tool_result")).is_error
    assert not (runtime.workspace(session) / "blocked.txt").exists()
