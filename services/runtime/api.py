"""The grpc.aio servicer of ``corral.runtime.v1.RuntimeService``: proto in, use case, proto out.

The runtime is internal: every method needs an authenticated internal service principal (its
token carries the ``service`` role; identity gives it to internal service accounts only). Users,
admins and superusers alike are PERMISSION_DENIED: the session service calls as itself and names
the user it acts for in ``RunTurnRequest.actor``. Every path is derived from the session: a turn's
workspace is the session's own (``workspaces/{session}``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import json_format

from corral.libs import agent_options
from corral.libs.auth.caller import Caller, require_caller
from corral.libs.errors import PermissionDenied, Validator
from corral.libs.names import ResourcePattern
from corral.runtime.v1 import runtime_event_pb2 as event_pb
from corral.runtime.v1 import runtime_service_pb2 as pb
from corral.runtime.v1 import runtime_service_pb2_grpc as pb_grpc
from corral.runtime.v1 import runtime_status_pb2 as status_pb
from corral.services.runtime import events as ev
from corral.services.runtime.domain import Behavior
from corral.services.runtime.service import RuntimeService
from corral.services.runtime.turn import TurnRequest

SESSION = ResourcePattern("sessions/{session}")
WORKSPACE = ResourcePattern("workspaces/{workspace}")
ORGANIZATION = ResourcePattern("organizations/{organization}")
# A turn's options are the session's merged over its organisation's policy: each may bring
# its share of MCP servers.
POLICY_SERVERS = agent_options.MAX_MCP_SERVERS
_BEHAVIORS = {
    event_pb.PERMISSION_BEHAVIOR_ALLOW: Behavior.ALLOW,
    event_pb.PERMISSION_BEHAVIOR_DENY: Behavior.DENY,
}


class RuntimeApi(pb_grpc.RuntimeServiceServicer):
    def __init__(self, service: RuntimeService) -> None:
        self._service = service

    async def RunTurn(
        self, request: pb.RunTurnRequest, context: Any
    ) -> AsyncIterator[pb.RunTurnResponse]:
        caller = require_service()
        turn = _turn_request(request)
        async for event in self._service.run_turn(caller, turn):
            yield pb.RunTurnResponse(event=event)

    async def InterruptTurn(
        self, request: pb.InterruptTurnRequest, context: Any
    ) -> pb.InterruptTurnResponse:
        caller = require_service()
        check = Validator()
        session_id = _running_turn(request, check)
        check.raise_if_any()
        await self._service.interrupt(caller, session_id, request.turn_id)
        return pb.InterruptTurnResponse()

    async def SubmitPermissionDecision(
        self, request: pb.SubmitPermissionDecisionRequest, context: Any
    ) -> pb.SubmitPermissionDecisionResponse:
        caller = require_service()
        check = Validator()
        session_id = _running_turn(request, check)
        check.require(request.permission_request_id, "permission_request_id")
        check.check(request.behavior in _BEHAVIORS, "behavior", "must be ALLOW or DENY")
        check.raise_if_any()
        decision = self._service.decide(
            caller,
            session_id,
            request.turn_id,
            request.permission_request_id,
            _BEHAVIORS[request.behavior],
            decided_by=request.decided_by,
            message=request.message,
            updated_input=(
                json_format.MessageToDict(request.updated_input)
                if request.HasField("updated_input")
                else None
            ),
        )
        return pb.SubmitPermissionDecisionResponse(
            permission_decision=ev.decision_message(decision)
        )

    async def ReleaseSession(
        self, request: pb.ReleaseSessionRequest, context: Any
    ) -> pb.ReleaseSessionResponse:
        caller = require_service()
        check = Validator()
        session_id = _id(SESSION, request.session, "session", check)
        check.raise_if_any()
        released = await self._service.release(caller, session_id, request.delete_transcript)
        return pb.ReleaseSessionResponse(process_released=released)

    async def GetRuntimeStatus(
        self, request: pb.GetRuntimeStatusRequest, context: Any
    ) -> pb.GetRuntimeStatusResponse:
        require_service()
        status = self._service.status()
        return pb.GetRuntimeStatusResponse(
            status=status_pb.RuntimeStatus(
                replica_id=status.replica_id,
                draining=status.draining,
                pool_size=status.pool_size,
                live_processes=status.live_processes,
                busy_processes=status.busy_processes,
                open_sessions=status.open_sessions,
                running_turns=status.running_turns,
                waiting_turns=status.waiting_turns,
                max_waiting_turns=status.max_waiting_turns,
                pending_permission_requests=status.pending_permission_requests,
                sdk_version=status.sdk_version,
                cli_version=status.cli_version,
            )
        )


def require_service() -> Caller:
    """The caller, if it is an internal service principal (a superuser is a person: refused)."""
    caller = require_caller()
    if not caller.is_service:
        raise PermissionDenied(
            "the agent runtime answers Corral's internal services only",
            reason="PERMISSION_DENIED",
        )
    return caller


def _id(pattern: ResourcePattern, name: str, field_path: str, check: Validator) -> str:
    """The id in ``name``, or a violation of ``field_path`` (and an empty id)."""
    ids = pattern.parse(name)
    check.check(ids is not None, field_path, f"must be {pattern.template}")
    return ids[0] if ids else ""


def _running_turn(
    request: pb.InterruptTurnRequest | pb.SubmitPermissionDecisionRequest, check: Validator
) -> str:
    """The session id of a request about a running turn (``session`` and ``turn_id``)."""
    session_id = _id(SESSION, request.session, "session", check)
    check.require(request.turn_id, "turn_id")
    return session_id


def _turn_request(request: pb.RunTurnRequest) -> TurnRequest:
    check = Validator()
    session_id = _id(SESSION, request.session, "session", check)
    check.require(request.turn_id, "turn_id")
    _id(ORGANIZATION, request.organization, "organization", check)
    check.require(request.actor, "actor")
    workspace_id = _id(WORKSPACE, request.workspace, "workspace", check)
    # The runtime derives every path from the session: its workspace is its own.
    check.check(
        not session_id or not workspace_id or workspace_id == session_id,
        "workspace",
        "must be the session's own workspace, workspaces/{session}",
    )
    check.check(request.HasField("options"), "options", "is required")
    check.require(request.prompt, "prompt")
    check.check(
        not request.fork_transcript or bool(request.resume_transcript_id),
        "fork_transcript",
        "needs resume_transcript_id",
    )
    agent_options.validate(request.options, check, "options", policy_servers=POLICY_SERVERS)
    check.raise_if_any()
    return TurnRequest(
        session_id=session_id,
        turn_id=request.turn_id,
        organization=request.organization,
        actor=request.actor,
        workspace_id=workspace_id,
        prompt=request.prompt,
        options=request.options,
        resume_transcript_id=request.resume_transcript_id,
        fork_transcript=request.fork_transcript,
    )
