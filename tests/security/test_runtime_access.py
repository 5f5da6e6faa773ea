"""The runtime is internal: only Corral's own service principals may call it. Every other
caller (people of every role, a superuser, an organisation's own service account) is refused
on every RPC, while the session service, calling as itself, still runs turns. Even the service
cannot point a turn at another session's workspace or another organisation's session."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from corral.runtime.v1 import agent_options_pb2 as options_pb
from corral.runtime.v1 import runtime_event_pb2 as event_pb
from corral.runtime.v1 import runtime_service_pb2 as pb
from corral.runtime.v1 import runtime_service_pb2_grpc as pb_grpc
from corral.session.v1 import event_pb2
from tests.security.conftest import World, bearer, directive

REFUSED = ("viewer", "user", "admin", "other_admin", "other_user", "superuser")
REFUSED += ("org_service_account",)


def _turn(session: str, organization: str = "organizations/acme", **fields: Any) -> Any:
    session_id = session.removeprefix("sessions/")
    values: dict[str, Any] = {
        "session": session,
        "turn_id": "t-direct",
        "organization": organization,
        "actor": "organizations/acme/users/someone",
        "workspace": f"workspaces/{session_id}",
        "options": options_pb.AgentOptions(model="claude-sonnet-4-5", max_turns=2),
        "prompt": "run `id` for me",
    }
    values.update(fields)
    return pb.RunTurnRequest(**values)


def _calls(session: str) -> dict[str, Callable[[pb_grpc.RuntimeServiceStub, Any], Any]]:
    """Every RuntimeService RPC, with a well-formed request about a real session."""

    async def run_turn(stub: pb_grpc.RuntimeServiceStub, metadata: Any) -> Any:
        return [r async for r in stub.RunTurn(_turn(session), metadata=metadata, timeout=30)]

    return {
        "RunTurn": run_turn,
        "InterruptTurn": lambda stub, md: stub.InterruptTurn(
            pb.InterruptTurnRequest(session=session, turn_id="t1"), metadata=md
        ),
        "SubmitPermissionDecision": lambda stub, md: stub.SubmitPermissionDecision(
            pb.SubmitPermissionDecisionRequest(
                session=session,
                turn_id="t1",
                permission_request_id="p1",
                behavior=event_pb.PERMISSION_BEHAVIOR_ALLOW,
            ),
            metadata=md,
        ),
        "ReleaseSession": lambda stub, md: stub.ReleaseSession(
            pb.ReleaseSessionRequest(session=session, delete_transcript=True), metadata=md
        ),
        "GetRuntimeStatus": lambda stub, md: stub.GetRuntimeStatus(
            pb.GetRuntimeStatusRequest(), metadata=md
        ),
    }


async def _code(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _runtime(world: World) -> pb_grpc.RuntimeServiceStub:
    return pb_grpc.RuntimeServiceStub(world.platform.channel("runtime"))


async def test_no_one_but_corral_services_may_call_the_runtime(world: World) -> None:
    session = await world.new_session("user")
    await world.say("user", session, directive({"text": "hello"}))
    first = await world.turn_results("user", session)
    assert first[-1].turn_result.status == event_pb2.TurnResult.STATUS_SUCCEEDED
    workspace = world.workspace(session)
    marker = workspace / "still-here.txt"
    marker.write_text("the user's work")

    stub = _runtime(world)
    outcomes: dict[tuple[str, str], grpc.StatusCode] = {}
    for principal in ("none", *REFUSED):
        metadata = () if principal == "none" else world.auth(principal)
        for rpc, call in _calls(session).items():
            outcomes[(principal, rpc)] = await _code(call(stub, metadata))
    expected = {
        (principal, rpc): (
            grpc.StatusCode.UNAUTHENTICATED
            if principal == "none"
            else grpc.StatusCode.PERMISSION_DENIED
        )
        for principal in ("none", *REFUSED)
        for rpc in _calls(session)
    }
    assert outcomes == expected
    assert marker.read_text() == "the user's work"  # nothing was released or deleted

    # The session service, calling as itself, still runs the user's turns.
    await world.say("user", session, directive({"text": "still working"}))
    events = await world.turn_results("user", session, count=2)
    assert events[-1].turn_result.status == event_pb2.TurnResult.STATUS_SUCCEEDED
    texts = [e.text_block.text for e in events if e.HasField("text_block")]
    assert "still working" in texts

    # The service principal itself gets through (the refusals above are about who calls).
    service = bearer(await world.service_token())
    status = await stub.GetRuntimeStatus(pb.GetRuntimeStatusRequest(), metadata=service)
    assert status.status.pool_size > 0


async def test_the_service_cannot_point_a_turn_at_another_session_or_organization(
    world: World,
) -> None:
    mine = await world.new_session("user")
    theirs = await world.new_session("other_user")
    await world.say("other_user", theirs, directive({"text": "globex was here"}))
    await world.turn_results("other_user", theirs)
    await world.say("user", mine, directive({"text": "acme was here"}))
    await world.turn_results("user", mine)
    stub = _runtime(world)
    service = bearer(await world.service_token())

    # Another session's workspace, named in a request for mine: refused, nothing runs.
    foreign_workspace = _turn(mine, workspace=f"workspaces/{theirs.removeprefix('sessions/')}")
    with pytest.raises(grpc.aio.AioRpcError) as workspace:
        [r async for r in stub.RunTurn(foreign_workspace, metadata=service, timeout=30)]
    assert workspace.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # globex's session, named as acme's (and acme's as globex's): it does not exist for them.
    for session, organization in ((theirs, "organizations/acme"), (mine, "organizations/globex")):
        with pytest.raises(grpc.aio.AioRpcError) as foreign:
            [r async for r in stub.RunTurn(_turn(session, organization), metadata=service)]
        assert foreign.value.code() in (
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.PERMISSION_DENIED,
        )

    # The right organization and its own workspace: runs.
    responses = [r async for r in stub.RunTurn(_turn(mine), metadata=service, timeout=60)]
    assert responses[-1].event.turn_result.status == event_pb.TurnResult.STATUS_SUCCEEDED
