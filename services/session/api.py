"""The SessionService servicer: proto <-> Python and the shape of requests; the rules live in
the service layer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import field_mask_pb2
from google.rpc import code_pb2

from corral.libs import agent_options
from corral.libs.audit import CallOrigins
from corral.libs.auth.caller import require_caller
from corral.libs.errors import Validator
from corral.libs.listing import (
    FieldSpec,
    LabelledFields,
    enum_value,
    fingerprint,
    list_query,
    page_from,
    parse_datetime,
    parse_filter,
)
from corral.libs.names import ids_of
from corral.libs.ratelimit import Networks
from corral.libs.timestamps import to_timestamp
from corral.libs.validation import (
    check_labels,
    check_request_id,
    check_text,
    check_update_mask,
)
from corral.services.session import options, policy
from corral.services.session.domain import (
    ORGANIZATION,
    POLICY,
    SESSION,
    TURN,
    AgentPolicyRecord,
    BusyStrategy,
    Session,
    Turn,
    Usage,
)
from corral.services.session.event_log import EventFilter
from corral.services.session.service import SessionService
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
MAX_DISPLAY_NAME = 200
MAX_PERMISSION_MESSAGE = 2000
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


SESSION_FIELDS = LabelledFields(
    {
        "state": FieldSpec("state", enum_value(STATES)),
        "owner": FieldSpec("owner"),
        "display_name": FieldSpec("display_name", prefix=True),
        "parent_session": FieldSpec("parent_session"),
        "organization": FieldSpec("organization"),
        "create_time": FieldSpec("create_time", parse_datetime),
        "update_time": FieldSpec("update_time", parse_datetime),
    }
)
SESSION_ORDER = {
    "update_time": "update_time",
    "create_time": "create_time",
    "display_name": "display_name",
}
EVENT_FIELDS = {"type": FieldSpec("type", enum_value(EVENT_TYPES)), "turn_id": FieldSpec("turn_id")}
UPDATABLE = frozenset({"display_name", "labels", "agent_options"})


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
        agent_options=options.redacted(
            agent_options_pb2.AgentOptions.FromString(session.agent_options)
        ),
        labels=session.labels,
        create_time=to_timestamp(session.create_time),
        update_time=to_timestamp(session.update_time),
        archive_time=to_timestamp(session.archive_time),
        last_sequence=session.last_sequence,
        usage=_usage(session.usage),
        turn_count=session.turn_count,
        current_turn=TURN.format(session.id, session.current_turn) if session.current_turn else "",
        parent_session=session.parent_session,
        fork_sequence=session.fork_sequence,
        workspace=session.workspace,
        etag=session.etag,
    )
    for payload in pending:
        out.pending_permission_requests.append(permission_pb2.PermissionRequest.FromString(payload))
    if session.failure_reason:
        out.failure.code = code_pb2.UNAVAILABLE
        out.failure.message = session.failure_message
    return out


def turn_to_proto(turn: Turn) -> turn_pb2.Turn:
    out = turn_pb2.Turn(
        name=turn.name,
        state=turn_pb2.Turn.State.Value(f"STATE_{turn.state.value}"),
        text=turn.text,
        sender=turn.sender,
        create_time=to_timestamp(turn.create_time),
        start_time=to_timestamp(turn.start_time),
        end_time=to_timestamp(turn.end_time),
        first_sequence=turn.first_sequence,
        last_sequence=turn.last_sequence,
        usage=_usage(turn.usage),
    )
    if turn.result:
        out.result.ParseFromString(turn.result)
    return out


def _session_id(name: str, field: str, check: Validator) -> str:
    return ids_of(SESSION, name, field, check)[0]


def _display_name(value: str, field: str, check: Validator) -> None:
    check_text(value, check, field, max_length=MAX_DISPLAY_NAME, lines=False)


class SessionApi(rpc.SessionServiceServicer):
    def __init__(self, service: SessionService, trusted_proxies: Networks | None = None) -> None:
        """``trusted_proxies``: who may name the client's address (the edge); the deployment's
        CORRAL_TRUSTED_PROXIES if not given."""
        self._service = service
        self._origin = CallOrigins(trusted_proxies).capture  # for a change's audit event

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
        self._origin(context)
        check = Validator()
        session = request.session
        _display_name(session.display_name, "session.display_name", check)
        agent_options.validate(session.agent_options, check, "session.agent_options")
        check_labels(session.labels, check, "session.labels")
        check_request_id(request.request_id, check)
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
        query = list_query(request, SESSION_FIELDS, SESSION_ORDER, default_order="update_time desc")
        sessions, token, total = await self._service.list_sessions(
            require_caller(),
            query.conditions,
            order=query.order,
            descending=query.descending,
            page=query.page,
        )
        return pb.ListSessionsResponse(
            sessions=[session_to_proto(s) for s in sessions],
            next_page_token=token,
            total_size=total,
        )

    async def UpdateSession(
        self, request: pb.UpdateSessionRequest, context: Any
    ) -> pb.UpdateSessionResponse:
        self._origin(context)
        check = Validator()
        sent = request.session
        session_id = _session_id(sent.name, "session.name", check)
        paths = check_update_mask(request.update_mask, UPDATABLE, check, nested=True)
        option_paths = [p.split(".", 1)[1] for p in paths if p.startswith("agent_options.")]
        check.check(
            field_mask_pb2.FieldMask(paths=option_paths).IsValidForDescriptor(
                agent_options_pb2.AgentOptions.DESCRIPTOR
            ),
            "update_mask",
            "names a field agent options do not have",
        )
        top = {p.split(".", 1)[0] for p in paths}
        if "display_name" in top:
            _display_name(sent.display_name, "session.display_name", check)
        if "labels" in top:
            check_labels(sent.labels, check, "session.labels")
        if "agent_options" in top:
            agent_options.validate(sent.agent_options, check, "session.agent_options")
        check.raise_if_any()
        session = await self._service.update_session(
            require_caller(),
            session_id,
            etag=sent.etag,
            paths=paths,
            display_name=sent.display_name,
            labels=dict(sent.labels),
            options=sent.agent_options,
        )
        return pb.UpdateSessionResponse(session=await self._proto(session))

    async def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: Any
    ) -> pb.DeleteSessionResponse:
        self._origin(context)
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
        self._origin(context)
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
        self._origin(context)
        check = Validator()
        session_id = _session_id(request.name, "name", check)
        _display_name(request.display_name, "display_name", check)
        check_request_id(request.request_id, check)
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
        policy.name = record.name
        policy.etag = record.etag
        if record.version:
            stamp = to_timestamp(record.update_time)
            assert stamp is not None
            policy.update_time.CopyFrom(stamp)
        return options.redacted_policy(policy)

    async def GetAgentPolicy(
        self, request: pb.GetAgentPolicyRequest, context: Any
    ) -> pb.GetAgentPolicyResponse:
        check = Validator()
        (org_id,) = ids_of(POLICY, request.name, "name", check)
        check.raise_if_any()
        organization = ORGANIZATION.format(org_id)
        record = await self._service.get_policy(require_caller(), organization)
        return pb.GetAgentPolicyResponse(agent_policy=self._policy_proto(record))

    async def UpdateAgentPolicy(
        self, request: pb.UpdateAgentPolicyRequest, context: Any
    ) -> pb.UpdateAgentPolicyResponse:
        self._origin(context)
        check = Validator()
        sent = request.agent_policy
        (org_id,) = ids_of(POLICY, sent.name, "agent_policy.name", check)
        paths = check_update_mask(request.update_mask, policy.FIELDS, check, nested=True)
        check.check(
            all("." not in p for p in paths), "update_mask", "name whole fields of the policy"
        )
        policy.validate(sent, paths, check)
        agent_options.validate(
            agent_options_pb2.AgentOptions(
                mcp_servers=sent.mcp_servers, permission_rules=sent.permission_rules
            ),
            check,
            "agent_policy",
        )
        check.raise_if_any()
        record = await self._service.update_policy(
            require_caller(), ORGANIZATION.format(org_id), etag=sent.etag, paths=paths, sent=sent
        )
        return pb.UpdateAgentPolicyResponse(agent_policy=self._policy_proto(record))

    async def SendMessage(
        self, request: pb.SendMessageRequest, context: Any
    ) -> pb.SendMessageResponse:
        self._origin(context)
        check = Validator()
        session_id = _session_id(request.session, "session", check)
        check_text(request.text, check, "text", max_length=MAX_TEXT, required=True)
        check_request_id(request.request_id, check)
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
        session_id, turn_id = ids_of(TURN, request.name, "name", check)
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
        self._origin(context)
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
        self._origin(context)
        check = Validator()
        session_id = _session_id(request.session, "session", check)
        check.require(request.permission_request_id, "permission_request_id")
        allow = request.decision == permission_pb2.PermissionDecision.DECISION_ALLOW
        check.check(
            request.decision != permission_pb2.PermissionDecision.DECISION_UNSPECIFIED,
            "decision",
            "must be DECISION_ALLOW or DECISION_DENY",
        )
        check_text(request.message, check, "message", max_length=MAX_PERMISSION_MESSAGE)
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
        rows, token, last = await self._service.list_events(
            require_caller(),
            session_id,
            after=request.after_sequence,
            event_filter=event_filter,
            page=page,
        )
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
