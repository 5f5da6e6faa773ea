"""The SessionService servicer: proto <-> domain, request validation, no business rules."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import field_mask_pb2, timestamp_pb2

from corral.libs.auth.caller import require_caller
from corral.libs.errors import Validator
from corral.libs.listing import (
    FieldSpec,
    enum_value,
    fingerprint,
    next_token,
    page_from,
    parse_filter,
    parse_order,
    parse_time,
)
from corral.services.session import options as agent_options
from corral.services.session.domain import (
    SESSION_PREFIX,
    AgentPolicyRecord,
    BusyStrategy,
    Session,
    Turn,
    Usage,
)
from corral.services.session.service import EventFilter, SessionService
from corral.session.v1 import (
    agent_options_pb2,
    agent_policy_pb2,
    event_pb2,
    permission_pb2,
    session_pb2,
    turn_pb2,
    usage_pb2,
)
from corral.session.v1 import session_service_pb2 as pb
from corral.session.v1 import session_service_pb2_grpc as rpc

MAX_TEXT = 100_000
_EVENT_FIELD = b"\x0a"  # StreamSessionEventsResponse.event: field 1, wire type 2


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


STATES = {
    s.removeprefix("STATE_"): s.removeprefix("STATE_") for s in session_pb2.Session.State.keys()[1:]
}
EVENT_TYPES = {  # enum_value matches upper-cased input: TEXT_DELTA or text_delta -> text_delta
    f.name.upper(): f.name
    for f in event_pb2.SessionEvent.DESCRIPTOR.oneofs_by_name["payload"].fields
}


def _time(value: str) -> datetime:
    return datetime.fromtimestamp(parse_time(value), UTC)


class _SessionFields(Mapping[str, FieldSpec]):
    """Filterable session fields, plus any ``labels.<key>``."""

    _fixed = {
        "state": FieldSpec("state", enum_value(STATES)),
        "owner": FieldSpec("owner"),
        "display_name": FieldSpec("display_name", prefix=True),
        "parent_session": FieldSpec("parent_session"),
        "organization": FieldSpec("organization"),
        "create_time": FieldSpec("create_time", _time),
        "update_time": FieldSpec("update_time", _time),
    }

    def __getitem__(self, key: str) -> FieldSpec:
        if key.startswith("labels.") and len(key) > len("labels."):
            return FieldSpec(key)
        return self._fixed[key]

    def __iter__(self) -> Any:
        return iter([*self._fixed, "labels.<key>"])

    def __len__(self) -> int:
        return len(self._fixed) + 1


SESSION_FIELDS = _SessionFields()
SESSION_ORDER = {
    "update_time": "update_time",
    "create_time": "create_time",
    "display_name": "display_name",
}
EVENT_FIELDS = {"type": FieldSpec("type", enum_value(EVENT_TYPES)), "turn_id": FieldSpec("turn_id")}
UPDATABLE = {"display_name", "labels", "agent_options"}


def _ts(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _usage(usage: Usage) -> usage_pb2.Usage:
    return usage_pb2.Usage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_input_tokens=usage.cache_read_input_tokens,
        cache_creation_input_tokens=usage.cache_creation_input_tokens,
        cost_usd_micros=usage.cost_usd_micros,
    )


def session_to_proto(session: Session, pending: list[bytes] = ()) -> session_pb2.Session:  # type: ignore[assignment]
    out = session_pb2.Session(
        name=session.name,
        organization=session.organization,
        owner=session.owner,
        display_name=session.display_name,
        state=session_pb2.Session.State.Value(f"STATE_{session.state.value}"),
        agent_options=agent_options.redacted(
            agent_options_pb2.AgentOptions.FromString(session.agent_options)
        ),
        labels=session.labels,
        create_time=_ts(session.create_time),
        update_time=_ts(session.update_time),
        archive_time=_ts(session.archive_time),
        last_sequence=session.last_sequence,
        usage=_usage(session.usage),
        turn_count=session.turn_count,
        current_turn=f"{session.name}/turns/{session.current_turn}" if session.current_turn else "",
        parent_session=session.parent_session,
        fork_sequence=session.fork_sequence,
        workspace=session.workspace,
        etag=session.etag,
    )
    for payload in pending:
        out.pending_permission_requests.append(permission_pb2.PermissionRequest.FromString(payload))
    if session.failure_reason:
        out.failure.code = grpc.StatusCode.UNAVAILABLE.value[0]
        out.failure.message = session.failure_message
    return out


def turn_to_proto(turn: Turn) -> turn_pb2.Turn:
    out = turn_pb2.Turn(
        name=turn.name,
        state=turn_pb2.Turn.State.Value(f"STATE_{turn.state.value}"),
        text=turn.text,
        sender=turn.sender,
        create_time=_ts(turn.create_time),
        start_time=_ts(turn.start_time),
        end_time=_ts(turn.end_time),
        first_sequence=turn.first_sequence,
        last_sequence=turn.last_sequence,
        usage=_usage(turn.usage),
    )
    if turn.result:
        out.result.ParseFromString(turn.result)
    return out


def _session_id(name: str, field: str, check: Validator) -> str:
    session_id = name.removeprefix(SESSION_PREFIX)
    check.check(
        name.startswith(SESSION_PREFIX) and session_id.isalnum() and len(session_id) <= 64,
        field,
        "must be a session name, `sessions/{session}`",
    )
    return session_id


def _policy_org(name: str, field: str, check: Validator) -> str:
    organization = name.removesuffix("/agentPolicy")
    org_id = organization.removeprefix("organizations/")
    check.check(
        name.endswith("/agentPolicy")
        and organization.startswith("organizations/")
        and bool(org_id)
        and "/" not in org_id,
        field,
        "must be `organizations/{organization}/agentPolicy`",
    )
    return organization


def _request_id(value: str, check: Validator) -> None:
    check.check(len(value) <= 100, "request_id", "at most 100 characters")


def _labels(labels: Mapping[str, str], check: Validator, field: str) -> None:
    check.check(len(labels) <= 64, field, "at most 64 labels")
    for key, value in labels.items():
        check.check(
            0 < len(key) <= 63 and key.replace("-", "_").replace(".", "_").isidentifier(),
            f"{field}.{key}",
            "keys are 1-63 letters, digits, '_', '-' or '.'",
        )
        check.check(len(value) <= 256, f"{field}.{key}", "values are at most 256 characters")


class SessionApi(rpc.SessionServiceServicer):
    def __init__(self, service: SessionService) -> None:
        self._service = service

    async def _proto(self, session: Session) -> session_pb2.Session:
        pending = (
            await self._service.pending_permissions(session.id)
            if session.state.value == "AWAITING_PERMISSION"
            else []
        )
        return session_to_proto(session, pending)

    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: Any
    ) -> pb.CreateSessionResponse:
        check = Validator()
        session = request.session
        check.check(
            len(session.display_name) <= 200, "session.display_name", "at most 200 characters"
        )
        agent_options.validate(session.agent_options, check, "session.agent_options")
        _labels(session.labels, check, "session.labels")
        _request_id(request.request_id, check)
        check.raise_if_any()
        created = await self._service.create_session(
            require_caller(),
            display_name=session.display_name,
            options=session.agent_options,
            labels=dict(session.labels),
            organization=session.organization,
            request_id=request.request_id,
        )
        return pb.CreateSessionResponse(session=await self._proto(created))

    async def GetSession(
        self, request: pb.GetSessionRequest, context: Any
    ) -> pb.GetSessionResponse:
        check = Validator()
        session_id = _session_id(request.name, "name", check)
        check.raise_if_any()
        session = await self._service.get_session(require_caller(), session_id)
        return pb.GetSessionResponse(session=await self._proto(session))

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: Any
    ) -> pb.ListSessionsResponse:
        conditions = parse_filter(request.filter, SESSION_FIELDS)
        order, descending = parse_order(request.order_by, SESSION_ORDER, "update_time desc")
        page = page_from(
            request.page_size,
            request.page_token,
            fingerprint(request.filter, request.order_by),
            default=50,
        )
        sessions, token, total = await self._service.list_sessions(
            require_caller(), conditions, order=order, descending=descending, page=page
        )
        return pb.ListSessionsResponse(
            sessions=[session_to_proto(s) for s in sessions],
            next_page_token=token,
            total_size=total,
        )

    async def UpdateSession(
        self, request: pb.UpdateSessionRequest, context: Any
    ) -> pb.UpdateSessionResponse:
        check = Validator()
        session_id = _session_id(request.session.name, "session.name", check)
        paths = set(request.update_mask.paths)
        check.check(bool(paths), "update_mask", "name the fields to change")
        if "*" in paths:
            paths = set(UPDATABLE)
        top = {p.split(".", 1)[0] for p in paths}
        for path in sorted(top - UPDATABLE):
            check.add(
                "update_mask",
                f"{path!r} cannot be changed; updatable: {', '.join(sorted(UPDATABLE))}",
            )
        if "agent_options" in top:
            agent_options.validate(request.session.agent_options, check, "session.agent_options")
        _labels(request.session.labels, check, "session.labels")
        check.check(
            len(request.session.display_name) <= 200,
            "session.display_name",
            "at most 200 characters",
        )
        check.raise_if_any()
        new_options = None
        if "agent_options" in top:
            current = await self._service.get_session(require_caller(), session_id)
            merged = agent_options_pb2.AgentOptions.FromString(current.agent_options)
            option_paths = [p.split(".", 1)[1] for p in paths if p.startswith("agent_options.")]
            if "agent_options" in paths or not option_paths:
                merged = request.session.agent_options
            else:
                mask = field_mask_pb2.FieldMask(paths=option_paths)
                mask.MergeMessage(
                    request.session.agent_options, merged, replace_repeated_field=True
                )
            new_options = merged
        session = await self._service.update_session(
            require_caller(),
            session_id,
            etag=request.session.etag,
            display_name=request.session.display_name if "display_name" in top else None,
            labels=dict(request.session.labels) if "labels" in top else None,
            options=new_options,
        )
        return pb.UpdateSessionResponse(session=await self._proto(session))

    async def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: Any
    ) -> pb.DeleteSessionResponse:
        check = Validator()
        session_id = _session_id(request.name, "name", check)
        check.raise_if_any()
        await self._service.delete_session(
            require_caller(), session_id, etag=request.etag, force=request.force
        )
        return pb.DeleteSessionResponse()

    async def ArchiveSession(
        self, request: pb.ArchiveSessionRequest, context: Any
    ) -> pb.ArchiveSessionResponse:
        check = Validator()
        session_id = _session_id(request.name, "name", check)
        check.raise_if_any()
        session = await self._service.archive_session(
            require_caller(), session_id, etag=request.etag
        )
        return pb.ArchiveSessionResponse(session=await self._proto(session))

    async def ForkSession(
        self, request: pb.ForkSessionRequest, context: Any
    ) -> pb.ForkSessionResponse:
        check = Validator()
        session_id = _session_id(request.name, "name", check)
        check.check(len(request.display_name) <= 200, "display_name", "at most 200 characters")
        _request_id(request.request_id, check)
        check.raise_if_any()
        session = await self._service.fork_session(
            require_caller(),
            session_id,
            display_name=request.display_name,
            request_id=request.request_id,
        )
        return pb.ForkSessionResponse(session=await self._proto(session))

    @staticmethod
    def _policy_proto(record: AgentPolicyRecord) -> agent_policy_pb2.AgentPolicy:
        policy = agent_policy_pb2.AgentPolicy.FromString(record.payload)
        policy.name = f"{record.organization}/agentPolicy"
        policy.etag = record.etag
        if record.version:
            stamp = _ts(record.update_time)
            assert stamp is not None
            policy.update_time.CopyFrom(stamp)
        return agent_options.redacted_policy(policy)

    async def GetAgentPolicy(
        self, request: pb.GetAgentPolicyRequest, context: Any
    ) -> pb.GetAgentPolicyResponse:
        check = Validator()
        organization = _policy_org(request.name, "name", check)
        check.raise_if_any()
        record = await self._service.get_policy(require_caller(), organization)
        return pb.GetAgentPolicyResponse(agent_policy=self._policy_proto(record))

    async def UpdateAgentPolicy(
        self, request: pb.UpdateAgentPolicyRequest, context: Any
    ) -> pb.UpdateAgentPolicyResponse:
        check = Validator()
        sent = request.agent_policy
        organization = _policy_org(sent.name, "agent_policy.name", check)
        paths = set(request.update_mask.paths)
        fields = {"mcp_servers", "permission_rules"}
        if "*" in paths:
            paths = fields
        check.check(bool(paths), "update_mask", "name the fields to change")
        for path in sorted(paths - fields):
            check.add("update_mask", f"{path!r} cannot be changed: mcp_servers, permission_rules")
        agent_options.validate(
            agent_options_pb2.AgentOptions(
                mcp_servers=sent.mcp_servers, permission_rules=sent.permission_rules
            ),
            check,
            "agent_policy",
        )
        check.raise_if_any()

        def change(policy: agent_policy_pb2.AgentPolicy) -> None:
            if "mcp_servers" in paths:
                del policy.mcp_servers[:]
                policy.mcp_servers.extend(sent.mcp_servers)
            if "permission_rules" in paths:
                del policy.permission_rules[:]
                policy.permission_rules.extend(sent.permission_rules)

        record = await self._service.update_policy(
            require_caller(), organization, etag=sent.etag, change=change
        )
        return pb.UpdateAgentPolicyResponse(agent_policy=self._policy_proto(record))

    async def SendMessage(
        self, request: pb.SendMessageRequest, context: Any
    ) -> pb.SendMessageResponse:
        check = Validator()
        session_id = _session_id(request.session, "session", check)
        check.check(0 < len(request.text) <= MAX_TEXT, "text", "must be 1-100,000 characters")
        _request_id(request.request_id, check)
        check.raise_if_any()
        strategy = {
            pb.SendMessageRequest.BUSY_STRATEGY_ENQUEUE: BusyStrategy.ENQUEUE,
            pb.SendMessageRequest.BUSY_STRATEGY_INTERRUPT: BusyStrategy.INTERRUPT,
        }.get(request.busy_strategy, BusyStrategy.REJECT)
        turn = await self._service.send_message(
            require_caller(),
            session_id,
            text=request.text,
            request_id=request.request_id,
            strategy=strategy,
        )
        return pb.SendMessageResponse(turn=turn_to_proto(turn))

    async def GetTurn(self, request: pb.GetTurnRequest, context: Any) -> pb.GetTurnResponse:
        check = Validator()
        session_name, _, turn_id = request.name.partition("/turns/")
        session_id = _session_id(session_name, "name", check)
        check.check(turn_id.isalnum(), "name", "must be `sessions/{session}/turns/{turn}`")
        check.raise_if_any()
        return pb.GetTurnResponse(
            turn=turn_to_proto(await self._service.get_turn(require_caller(), session_id, turn_id))
        )

    async def ListTurns(self, request: pb.ListTurnsRequest, context: Any) -> pb.ListTurnsResponse:
        check = Validator()
        session_id = _session_id(request.parent, "parent", check)
        check.check(not request.filter, "filter", "not supported for turns yet")
        check.check(
            request.order_by in ("", "create_time"), "order_by", "turns are listed oldest first"
        )
        check.raise_if_any()
        page = page_from(
            request.page_size, request.page_token, fingerprint(request.parent), default=50
        )
        turns, token = await self._service.list_turns(require_caller(), session_id, page)
        return pb.ListTurnsResponse(turns=[turn_to_proto(t) for t in turns], next_page_token=token)

    async def InterruptTurn(
        self, request: pb.InterruptTurnRequest, context: Any
    ) -> pb.InterruptTurnResponse:
        check = Validator()
        session_id = _session_id(request.session, "session", check)
        turn_id = request.turn_id.rpartition("/turns/")[2]
        check.raise_if_any()
        turn = await self._service.interrupt_turn(
            require_caller(), session_id, turn_id=turn_id, cancel_queued=request.cancel_queued
        )
        return pb.InterruptTurnResponse(turn=turn_to_proto(turn))

    async def RespondToPermission(
        self, request: pb.RespondToPermissionRequest, context: Any
    ) -> pb.RespondToPermissionResponse:
        check = Validator()
        session_id = _session_id(request.session, "session", check)
        check.require(request.permission_request_id, "permission_request_id")
        allow = request.decision == permission_pb2.PermissionDecision.DECISION_ALLOW
        check.check(
            request.decision != permission_pb2.PermissionDecision.DECISION_UNSPECIFIED,
            "decision",
            "must be DECISION_ALLOW or DECISION_DENY",
        )
        check.check(len(request.message) <= 2000, "message", "at most 2,000 characters")
        check.check(
            allow or not request.HasField("updated_input"),
            "updated_input",
            "only with DECISION_ALLOW",
        )
        check.raise_if_any()
        caller = require_caller()
        await self._service.respond_to_permission(
            caller,
            session_id,
            request_id=request.permission_request_id,
            allow=allow,
            message=request.message,
            updated_input=request.updated_input if request.HasField("updated_input") else None,
        )
        decision = permission_pb2.PermissionDecision(
            permission_request_id=request.permission_request_id,
            decision=request.decision,
            source=permission_pb2.PermissionDecision.SOURCE_USER,
            decided_by=caller.subject,
            message=request.message,
        )
        if request.HasField("updated_input"):
            decision.updated_input.CopyFrom(request.updated_input)
        return pb.RespondToPermissionResponse(permission_decision=decision)

    async def ListSessionEvents(
        self, request: pb.ListSessionEventsRequest, context: Any
    ) -> pb.ListSessionEventsResponse:
        check = Validator()
        session_id = _session_id(request.parent, "parent", check)
        check.check(request.after_sequence >= 0, "after_sequence", "must not be negative")
        check.raise_if_any()
        event_filter = EventFilter.from_conditions(parse_filter(request.filter, EVENT_FIELDS))
        page = page_from(
            request.page_size,
            request.page_token,
            fingerprint(request.parent, request.after_sequence, request.filter),
            default=100,
        )
        after = int(page.after[0]) if page.after is not None else request.after_sequence
        rows, last = await self._service.list_events(
            require_caller(),
            session_id,
            after=after,
            limit=page.size + 1,
            event_filter=event_filter,
        )
        more = len(rows) > page.size
        rows = rows[: page.size]
        token = next_token(page, (rows[-1].sequence, "") if more and rows else None)
        return pb.ListSessionEventsResponse(
            session_events=[event_pb2.SessionEvent.FromString(r.payload) for r in rows],
            next_page_token=token,
            last_sequence=last,
        )

    async def StreamSessionEvents(  # type: ignore[override]  # yields encoded responses
        self, request: pb.StreamSessionEventsRequest, context: Any
    ) -> AsyncIterator[bytes]:
        check = Validator()
        session_id = _session_id(request.session, "session", check)
        check.check(request.after_sequence >= 0, "after_sequence", "must not be negative")
        check.raise_if_any()
        event_filter = EventFilter.from_conditions(parse_filter(request.filter, EVENT_FIELDS))
        # Headers now, not with the first event: a client (and a proxy) knows the stream is live.
        await context.send_initial_metadata(())
        async for _, payload in self._service.watch(
            require_caller(), session_id, after=request.after_sequence, event_filter=event_filter
        ):
            # StreamSessionEventsResponse{event = payload}, encoded without a parse: field 1,
            # length-delimited. The kit's interceptor passes bytes through unserialised.
            yield _EVENT_FIELD + _varint(len(payload)) + payload
