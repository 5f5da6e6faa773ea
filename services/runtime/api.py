"""The grpc.aio servicer of ``corral.runtime.v1.RuntimeService``: proto in, use case, proto out.

Every method needs an authenticated caller (the interceptor verified the token); what the caller
may touch is the service layer's business.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import json_format

from corral.libs.auth.caller import require_caller
from corral.libs.errors import Validator
from corral.runtime.v1 import agent_options_pb2 as options_pb
from corral.runtime.v1 import runtime_event_pb2 as event_pb
from corral.runtime.v1 import runtime_service_pb2 as pb
from corral.runtime.v1 import runtime_service_pb2_grpc as pb_grpc
from corral.runtime.v1 import runtime_status_pb2 as status_pb
from corral.services.runtime import events as ev
from corral.services.runtime.domain import Behavior, resource_id
from corral.services.runtime.service import RuntimeService, TurnRequest

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SERVER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
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
        caller = require_caller()
        turn = _turn_request(request)
        async for event in self._service.run_turn(caller, turn):
            yield pb.RunTurnResponse(event=event)

    async def InterruptTurn(
        self, request: pb.InterruptTurnRequest, context: Any
    ) -> pb.InterruptTurnResponse:
        caller = require_caller()
        check = Validator()
        session_id = _session_id(request.session, check)
        check.require(request.turn_id, "turn_id")
        check.raise_if_any()
        await self._service.interrupt(caller, session_id, request.turn_id)
        return pb.InterruptTurnResponse()

    async def SubmitPermissionDecision(
        self, request: pb.SubmitPermissionDecisionRequest, context: Any
    ) -> pb.SubmitPermissionDecisionResponse:
        caller = require_caller()
        check = Validator()
        session_id = _session_id(request.session, check)
        check.require(request.turn_id, "turn_id")
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
        caller = require_caller()
        check = Validator()
        session_id = _session_id(request.session, check)
        check.raise_if_any()
        released = await self._service.release(caller, session_id, request.delete_transcript)
        return pb.ReleaseSessionResponse(process_released=released)

    async def GetRuntimeStatus(
        self, request: pb.GetRuntimeStatusRequest, context: Any
    ) -> pb.GetRuntimeStatusResponse:
        require_caller()
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
                pending_permission_requests=status.pending_permission_requests,
                sdk_version=status.sdk_version,
                cli_version=status.cli_version,
            )
        )


def _session_id(name: str, check: Validator) -> str:
    session_id = resource_id(name, "sessions")
    check.check(session_id is not None, "session", "must be sessions/{session}")
    return session_id or ""


def _turn_request(request: pb.RunTurnRequest) -> TurnRequest:
    check = Validator()
    session_id = _session_id(request.session, check)
    check.require(request.turn_id, "turn_id")
    check.check(
        resource_id(request.organization, "organizations") is not None,
        "organization",
        "must be organizations/{organization}",
    )
    check.require(request.actor, "actor")
    workspace_id = resource_id(request.workspace, "workspaces")
    check.check(workspace_id is not None, "workspace", "must be workspaces/{workspace}")
    check.check(request.HasField("options"), "options", "is required")
    check.require(request.prompt, "prompt")
    check.check(
        not request.fork_transcript or bool(request.resume_transcript_id),
        "fork_transcript",
        "needs resume_transcript_id",
    )
    _check_options(request.options, check)
    check.raise_if_any()
    return TurnRequest(
        session_id=session_id,
        turn_id=request.turn_id,
        organization=request.organization,
        actor=request.actor,
        workspace_id=workspace_id or "",
        prompt=request.prompt,
        options=request.options,
        resume_transcript_id=request.resume_transcript_id,
        fork_transcript=request.fork_transcript,
    )


def _check_options(options: options_pb.AgentOptions, check: Validator) -> None:
    check.check(options.max_turns >= 0, "options.max_turns", "must not be negative")
    check.check(
        options.max_budget_usd_micros >= 0, "options.max_budget_usd_micros", "must not be negative"
    )
    check.check(
        options.max_thinking_tokens >= 0, "options.max_thinking_tokens", "must not be negative"
    )
    check.check(
        options.permission_timeout.ToNanoseconds() >= 0,
        "options.permission_timeout",
        "must not be negative",
    )
    for i, rule in enumerate(options.permission_rules):
        where = f"options.permission_rules[{i}]"
        check.check(bool(rule.tool_pattern), f"{where}.tool_pattern", "is required")
        check.check(
            rule.action != options_pb.PermissionRule.ACTION_UNSPECIFIED,
            f"{where}.action",
            "must be ALLOW, DENY or ASK",
        )
    names = set()
    for i, server in enumerate(options.mcp_servers):
        where = f"options.mcp_servers[{i}]"
        check.check(
            bool(_SERVER_NAME.match(server.name)) and server.name not in names,
            f"{where}.name",
            "must be unique, 1-64 letters, digits, '_' or '-'",
        )
        names.add(server.name)
        transport = server.WhichOneof("transport")
        check.check(transport is not None, f"{where}.transport", "stdio or http is required")
        if transport == "stdio":
            check.require(server.stdio.command, f"{where}.stdio.command")
        elif transport == "http":
            check.require(server.http.url, f"{where}.http.url")
    for name in options.env:
        check.check(bool(_ENV_NAME.match(name)), f"options.env[{name}]", "is not a variable name")
