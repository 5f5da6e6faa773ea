"""The session service as a client sees it: sessions, turns and the resumable event stream."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from corral.services.session.domain import now
from corral.session.v1 import agent_options_pb2 as opts
from corral.session.v1 import agent_policy_pb2, event_pb2, permission_pb2, session_pb2
from corral.session.v1 import session_service_pb2 as pb
from tests.session.conftest import GLOBEX, LEASE_SECONDS, Stack

Event = event_pb2.SessionEvent
M = TypeVar("M", bound=Message)


async def create(stack: Stack, user: str = "alice", **kw: Any) -> session_pb2.Session:
    reply = await stack.stub.CreateSession(
        pb.CreateSessionRequest(session=session_pb2.Session(display_name="demo")),
        metadata=stack.auth(user, **kw),
    )
    return reply.session


async def send(
    stack: Stack, session: str, text: str = "hello", user: str = "alice", **kw: Any
) -> pb.SendMessageResponse:
    strategy = kw.pop("strategy", pb.SendMessageRequest.BUSY_STRATEGY_REJECT)
    return await stack.stub.SendMessage(
        pb.SendMessageRequest(
            session=session, text=text, busy_strategy=strategy, request_id=kw.pop("request_id", "")
        ),
        metadata=stack.auth(user, **kw),
    )


async def collect(
    stack: Stack,
    session: str,
    after: int = 0,
    *,
    until: str = "turn_result",
    count: int = 1,
    user: str = "alice",
    live: asyncio.Event | None = None,
) -> list[Event]:
    """Stream until ``count`` events of kind ``until`` arrived (heartbeats dropped). ``live``
    is set at the first heartbeat: the watcher has replayed the history and tails live events."""
    seen: list[Event] = []
    call = stack.stub.StreamSessionEvents(
        pb.StreamSessionEventsRequest(session=session, after_sequence=after),
        metadata=stack.auth(user),
    )
    async with asyncio.timeout(10):
        async for response in call:
            if response.event.HasField("heartbeat"):
                if live is not None:
                    live.set()
                continue
            seen.append(response.event)
            if sum(1 for e in seen if e.WhichOneof("payload") == until) >= count:
                call.cancel()
                break
    return seen


def kinds(events: list[Event]) -> list[str]:
    return [e.WhichOneof("payload") or "" for e in events]


def detail(error: grpc.aio.AioRpcError, kind: type[M]) -> M | None:
    """The error's status detail of type ``kind`` (ErrorInfo, BadRequest, ...), if sent."""
    status = rpc_status.from_call(error)
    assert status is not None
    for packed in status.details:
        if packed.Is(kind.DESCRIPTOR):
            out = kind()
            packed.Unpack(out)
            return out
    return None


def reason(error: grpc.aio.AioRpcError) -> str:
    info = detail(error, error_details_pb2.ErrorInfo)
    assert info is not None, "no ErrorInfo"
    return str(info.reason)


def violated_fields(error: grpc.aio.AioRpcError) -> set[str]:
    bad = detail(error, error_details_pb2.BadRequest)
    return {v.field for v in bad.field_violations} if bad is not None else set()


async def test_turn_streams_in_order_with_contiguous_sequences(stack: Stack) -> None:
    session = await create(stack)
    turn = (await send(stack, session.name, "say hello")).turn
    assert turn.first_sequence == 1
    fake = await stack.runtime.next_turn()
    assert (
        fake.request.prompt == "say hello" and fake.token
    )  # the sender's token travels with the turn
    fake.text("Hel", "lo", " world")
    fake.finish()
    events = await collect(stack, session.name)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert kinds(events) == [
        "user_message",
        "state_changed",
        "turn_started",
        "text_delta",
        "text_delta",
        "text_delta",
        "text_block",
        "turn_result",
    ]
    assert "".join(e.text_delta.text for e in events if e.HasField("text_delta")) == "Hello world"
    assert all(e.session == session.name and e.turn_id == fake.id for e in events)
    # The turn ends in the transaction that writes its result: no waiting for it.
    done = await stack.stub.GetTurn(pb.GetTurnRequest(name=turn.name), metadata=stack.auth())
    assert done.turn.state == done.turn.STATE_FINISHED
    assert done.turn.result.status == event_pb2.TurnResult.STATUS_SUCCEEDED
    got = (
        await stack.stub.GetSession(pb.GetSessionRequest(name=session.name), metadata=stack.auth())
    ).session
    assert got.state == session_pb2.Session.STATE_IDLE
    assert got.usage.cost_usd_micros == 500 and got.turn_count == 1
    await stack.ledger.wait_settled()  # settled after the result is written
    assert not stack.ledger.held  # usage settled, the slot released


async def test_a_turns_last_sequence_is_its_newest_event_while_it_runs(stack: Stack) -> None:
    """Turn.last_sequence: the turn's newest event so far, as its events are written, and
    never an event of the turn queued behind it."""

    async def turn_of(name: str) -> Any:
        reply = await stack.stub.GetTurn(pb.GetTurnRequest(name=name), metadata=stack.auth())
        return reply.turn

    session = await create(stack)
    first = (await send(stack, session.name, "first")).turn
    assert first.last_sequence == first.first_sequence == 1  # its user_message
    fake = await stack.runtime.next_turn()
    fake.text("one", "two")
    so_far = await collect(stack, session.name, until="text_block")
    assert (await turn_of(first.name)).last_sequence == so_far[-1].sequence  # mid-turn

    queued = (
        await send(
            stack, session.name, "second", strategy=pb.SendMessageRequest.BUSY_STRATEGY_ENQUEUE
        )
    ).turn
    assert queued.first_sequence == queued.last_sequence == so_far[-1].sequence + 1
    assert (await turn_of(first.name)).last_sequence == so_far[-1].sequence  # not the queued one's

    fake.finish()
    second = await stack.runtime.next_turn()
    second.text("three")
    events = await collect(stack, session.name, until="text_block", count=2)
    mine = [e.sequence for e in events if e.turn_id == fake.id]
    theirs = [e.sequence for e in events if e.turn_id == second.id]
    assert (await turn_of(first.name)).last_sequence == max(mine)
    assert (await turn_of(queued.name)).last_sequence == max(theirs) > max(mine)
    second.finish()


async def test_two_watchers_see_identical_sequences(stack: Stack) -> None:
    session = await create(stack)
    live = [asyncio.Event(), asyncio.Event()]
    first = asyncio.create_task(collect(stack, session.name, live=live[0]))
    second = asyncio.create_task(collect(stack, session.name, live=live[1]))
    async with asyncio.timeout(5):
        await asyncio.gather(*(e.wait() for e in live))  # both tail live events now
    await send(stack, session.name)
    fake = await stack.runtime.next_turn()
    fake.text(*[f"part{i} " for i in range(50)])
    fake.finish()
    a, b = await first, await second
    assert [e.SerializeToString() for e in a] == [e.SerializeToString() for e in b]
    assert len(a) == 55  # user message, state, started, 50 deltas, block, result


async def test_reconnect_with_last_sequence_misses_nothing_and_repeats_nothing(
    stack: Stack,
) -> None:
    session = await create(stack)
    await send(stack, session.name)
    fake = await stack.runtime.next_turn()
    fake.text("one ", "two ")
    early = await collect(stack, session.name, until="text_delta", count=2)
    last = early[-1].sequence
    fake.text("three ", "four ")  # produced while the watcher is away
    fake.finish()
    later = await collect(stack, session.name, after=last)
    assert later[0].sequence == last + 1
    everything = early + later
    assert [e.sequence for e in everything] == list(range(1, len(everything) + 1))
    full = await collect(stack, session.name)
    assert [e.SerializeToString() for e in full] == [e.SerializeToString() for e in everything]


async def test_quiet_stream_gets_heartbeats(stack: Stack) -> None:
    session = await create(stack)
    call = stack.stub.StreamSessionEvents(
        pb.StreamSessionEventsRequest(session=session.name), metadata=stack.auth()
    )
    async with asyncio.timeout(5):
        response = await call.read()
    call.cancel()
    assert response.event.HasField("heartbeat") and response.event.sequence == 0


async def test_history_pages_and_filter(stack: Stack) -> None:
    session = await create(stack)
    await send(stack, session.name)
    fake = await stack.runtime.next_turn()
    fake.text(*"abcdefgh")
    fake.finish()
    await collect(stack, session.name)
    page = await stack.stub.ListSessionEvents(
        pb.ListSessionEventsRequest(parent=session.name, page_size=3, filter="type != text_delta"),
        metadata=stack.auth(),
    )
    rest = await stack.stub.ListSessionEvents(
        pb.ListSessionEventsRequest(
            parent=session.name,
            page_size=3,
            filter="type != text_delta",
            page_token=page.next_page_token,
        ),
        metadata=stack.auth(),
    )
    assert kinds(list(page.session_events) + list(rest.session_events)) == [
        "user_message",
        "state_changed",
        "turn_started",
        "text_block",
        "turn_result",
        "state_changed",
    ]
    assert rest.next_page_token == ""


async def test_busy_strategies(stack: Stack) -> None:
    session = await create(stack)
    await send(stack, session.name, "first")
    first = await stack.runtime.next_turn()
    with pytest.raises(grpc.aio.AioRpcError) as busy:
        await send(stack, session.name, "rejected")
    assert (
        busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        and reason(busy.value) == "SESSION_BUSY"
    )

    queued = (
        await send(
            stack, session.name, "second", strategy=pb.SendMessageRequest.BUSY_STRATEGY_ENQUEUE
        )
    ).turn
    assert queued.state == queued.STATE_QUEUED
    first.finish()
    second = await stack.runtime.next_turn()
    assert second.request.prompt == "second"
    assert second.request.resume_transcript_id == "tx-1"  # the conversation continues

    await send(stack, session.name, "third", strategy=pb.SendMessageRequest.BUSY_STRATEGY_INTERRUPT)
    third = await stack.runtime.next_turn()
    assert stack.runtime.interrupted == [second.id]
    assert third.request.prompt == "third"
    third.finish()
    events = await collect(stack, session.name, until="turn_result", count=3)
    statuses = [e.turn_result.status for e in events if e.HasField("turn_result")]
    assert statuses == [
        event_pb2.TurnResult.STATUS_SUCCEEDED,
        event_pb2.TurnResult.STATUS_INTERRUPTED,
        event_pb2.TurnResult.STATUS_SUCCEEDED,
    ]


async def test_runtime_dying_mid_turn_fails_the_turn_keeps_events_and_next_turn_resumes(
    stack: Stack,
) -> None:
    session = await create(stack)
    await send(stack, session.name)
    fake = await stack.runtime.next_turn()
    fake.text("partial ")
    fake.crash()
    events = await collect(stack, session.name)
    assert kinds(events)[-3:] == ["text_block", "error", "turn_result"]
    assert events[-1].turn_result.status == event_pb2.TurnResult.STATUS_FAILED
    assert events[-2].error.reason == "RUNTIME_UNAVAILABLE"
    got = (
        await stack.stub.GetSession(pb.GetSessionRequest(name=session.name), metadata=stack.auth())
    ).session
    assert got.state == session_pb2.Session.STATE_FAILED
    await send(stack, session.name, "again")
    retry = await stack.runtime.next_turn()
    assert retry.request.resume_transcript_id == "tx-1"
    retry.finish()
    await collect(stack, session.name, until="turn_result", count=2)


async def test_permission_request_waits_for_the_owner(stack: Stack) -> None:
    session = await create(stack)
    await send(stack, session.name)
    fake = await stack.runtime.next_turn()
    fake.emit(
        permission_request={"id": "p1", "tool_name": "Bash", "input": {"command": "rm -rf /tmp/x"}}
    )
    await collect(stack, session.name, until="permission_request")
    got = (
        await stack.stub.GetSession(pb.GetSessionRequest(name=session.name), metadata=stack.auth())
    ).session
    assert got.state == session_pb2.Session.STATE_AWAITING_PERMISSION
    assert [p.id for p in got.pending_permission_requests] == ["p1"]
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stack.stub.RespondToPermission(
            pb.RespondToPermissionRequest(
                session=session.name,
                permission_request_id="nope",
                decision=permission_pb2.PermissionDecision.DECISION_ALLOW,
            ),
            metadata=stack.auth(),
        )
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    await stack.stub.RespondToPermission(
        pb.RespondToPermissionRequest(
            session=session.name,
            permission_request_id="p1",
            decision=permission_pb2.PermissionDecision.DECISION_DENY,
            message="no",
        ),
        metadata=stack.auth(),
    )
    assert stack.runtime.decisions == [("p1", False, "organizations/acme/users/alice")]
    events = await collect(stack, session.name, until="permission_decision")
    assert (
        events[-1].permission_decision.decision == permission_pb2.PermissionDecision.DECISION_DENY
    )
    fake.finish()
    await collect(stack, session.name)
    # Every state change is audited now (session.create, session.send_message, ...): the
    # decision is audited once, as a denial.
    await stack.audit.wait_for("permission.deny")
    decisions = [r for r in stack.audit.records if r["action"].startswith("permission.")]
    assert [(r["action"], r["outcome"]) for r in decisions] == [("permission.deny", "DENIED")]


async def test_quota_exhaustion_stops_the_turn_before_it_starts(stack: Stack) -> None:
    stack.ledger.limit = 1
    one, two = await create(stack), await create(stack)
    await send(stack, one.name)
    await stack.runtime.next_turn()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await send(stack, two.name)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason(refused.value) == "QUOTA_EXCEEDED"
    history = await stack.stub.ListSessionEvents(
        pb.ListSessionEventsRequest(parent=two.name), metadata=stack.auth()
    )
    assert list(history.session_events) == [] and len(stack.runtime.turns) == 1


async def test_other_organisations_see_nothing_and_viewers_only_read(stack: Stack) -> None:
    session = await create(stack)
    stranger = stack.auth("mallory", org=GLOBEX, roles=("admin",))
    for call in (
        stack.stub.GetSession(pb.GetSessionRequest(name=session.name), metadata=stranger),
        stack.stub.SendMessage(
            pb.SendMessageRequest(session=session.name, text="hi"), metadata=stranger
        ),
        stack.stub.DeleteSession(pb.DeleteSessionRequest(name=session.name), metadata=stranger),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await call
        assert denied.value.code() == grpc.StatusCode.NOT_FOUND
    stream = stack.stub.StreamSessionEvents(
        pb.StreamSessionEventsRequest(session=session.name), metadata=stranger
    )
    with pytest.raises(grpc.aio.AioRpcError) as hidden:
        await stream.read()
    assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
    other_user = stack.auth("bob")
    with pytest.raises(grpc.aio.AioRpcError) as private:
        await stack.stub.GetSession(pb.GetSessionRequest(name=session.name), metadata=other_user)
    assert private.value.code() == grpc.StatusCode.NOT_FOUND
    viewer = stack.auth("victor", roles=("viewer",))
    assert (
        await stack.stub.GetSession(pb.GetSessionRequest(name=session.name), metadata=viewer)
    ).session.name
    with pytest.raises(grpc.aio.AioRpcError) as read_only:
        await stack.stub.SendMessage(
            pb.SendMessageRequest(session=session.name, text="hi"), metadata=viewer
        )
    assert read_only.value.code() == grpc.StatusCode.PERMISSION_DENIED
    listed = await stack.stub.ListSessions(pb.ListSessionsRequest(), metadata=stranger)
    assert list(listed.sessions) == []


async def test_invalid_requests_name_their_fields(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stack.stub.SendMessage(
            pb.SendMessageRequest(session="nope", text=""), metadata=stack.auth()
        )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(bad.value) == {"session", "text"}
    with pytest.raises(grpc.aio.AioRpcError) as bad_filter:
        await stack.stub.ListSessions(
            pb.ListSessionsRequest(filter="colour = blue"), metadata=stack.auth()
        )
    assert bad_filter.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_restart_mid_turn_ends_it_failed_and_keeps_its_events(stack: Stack) -> None:
    session = await create(stack)
    await send(stack, session.name)
    fake = await stack.runtime.next_turn()
    fake.text("before the crash")
    await collect(stack, session.name, until="text_block")
    replica = stack.make_service()  # another replica, alive all along
    await replica.recover()
    got = (
        await stack.stub.GetSession(pb.GetSessionRequest(name=session.name), metadata=stack.auth())
    ).session
    assert got.state == session_pb2.Session.STATE_RUNNING  # a live process's turn is left alone
    await stack.service.close(graceful=False)  # the process dies: its driver and leases stop
    await replica.close()
    later = now() + timedelta(seconds=2 * LEASE_SECONDS)
    replica = stack.make_service(clock=lambda: later)  # a replica whose time is past the lease
    await replica.recover()
    events = await collect(stack, session.name)
    assert kinds(events)[:7] == [
        "user_message",
        "state_changed",
        "turn_started",
        "text_delta",
        "text_block",
        "error",
        "turn_result",
    ]
    assert events[6].turn_result.status == event_pb2.TurnResult.STATUS_FAILED
    await replica.close()


async def test_list_sessions_filters_orders_and_pages(stack: Stack) -> None:
    names = [(await create(stack)).name for _ in range(5)]
    seen: list[str] = []
    token = ""
    while True:
        page = await stack.stub.ListSessions(
            pb.ListSessionsRequest(
                page_size=2, page_token=token, order_by="create_time", filter="state = IDLE"
            ),
            metadata=stack.auth(),
        )
        seen.extend(s.name for s in page.sessions)
        assert page.total_size == 5
        token = page.next_page_token
        if not token:
            break
    assert seen == names


async def test_archived_session_streams_its_history_then_ends(stack: Stack) -> None:
    session = await create(stack)
    await send(stack, session.name)
    fake = await stack.runtime.next_turn()
    fake.text("bye")
    fake.finish()
    await collect(stack, session.name)
    await stack.stub.ArchiveSession(
        pb.ArchiveSessionRequest(name=session.name), metadata=stack.auth()
    )
    call = stack.stub.StreamSessionEvents(
        pb.StreamSessionEventsRequest(session=session.name), metadata=stack.auth()
    )
    async with asyncio.timeout(5):
        history = [r.event async for r in call]
    assert kinds(history)[-1] == "state_changed"
    assert history[-1].state_changed.state == session_pb2.Session.STATE_ARCHIVED
    assert await call.code() == grpc.StatusCode.OK


async def test_deleted_session_ends_its_watchers_with_not_found(stack: Stack) -> None:
    session = await create(stack)
    call = stack.stub.StreamSessionEvents(
        pb.StreamSessionEventsRequest(session=session.name), metadata=stack.auth()
    )
    await stack.stub.DeleteSession(
        pb.DeleteSessionRequest(name=session.name), metadata=stack.auth()
    )
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        async with asyncio.timeout(5):
            async for _ in call:
                pass
    assert ended.value.code() == grpc.StatusCode.NOT_FOUND


async def test_organisation_policy_comes_before_the_sessions_own_rules(stack: Stack) -> None:
    admin = stack.auth("ada", roles=("admin",))
    policy = pb.UpdateAgentPolicyRequest(
        agent_policy=agent_policy_pb2.AgentPolicy(
            name="organizations/acme/agentPolicy",
            permission_rules=[
                opts.PermissionRule(tool_pattern="Bash", action=opts.PermissionRule.ACTION_ASK)
            ],
            mcp_servers=[
                opts.McpServer(
                    name="tickets",
                    http=opts.McpHttpTransport(
                        url="https://mcp.example/tickets",
                        secret_headers={"authorization": "Bearer s3cret"},
                    ),
                )
            ],
        ),
        update_mask=field_mask_pb2.FieldMask(paths=["*"]),
    )
    with pytest.raises(grpc.aio.AioRpcError) as not_admin:
        await stack.stub.UpdateAgentPolicy(policy, metadata=stack.auth())
    assert not_admin.value.code() == grpc.StatusCode.PERMISSION_DENIED
    stored = (await stack.stub.UpdateAgentPolicy(policy, metadata=admin)).agent_policy
    assert b"s3cret" not in stored.SerializeToString()
    assert list(stored.mcp_servers[0].http.secret_header_keys) == ["authorization"]
    read = (
        await stack.stub.GetAgentPolicy(
            pb.GetAgentPolicyRequest(name="organizations/acme/agentPolicy"), metadata=stack.auth()
        )
    ).agent_policy
    assert read.etag == stored.etag
    with pytest.raises(grpc.aio.AioRpcError) as foreign:
        await stack.stub.GetAgentPolicy(
            pb.GetAgentPolicyRequest(name="organizations/acme/agentPolicy"),
            metadata=stack.auth("eve", org=GLOBEX),
        )
    assert foreign.value.code() == grpc.StatusCode.NOT_FOUND

    session = (
        await stack.stub.CreateSession(
            pb.CreateSessionRequest(
                session=session_pb2.Session(
                    agent_options=opts.AgentOptions(
                        allowed_tools=["Bash"],
                        permission_rules=[
                            opts.PermissionRule(
                                tool_pattern="*", action=opts.PermissionRule.ACTION_ALLOW
                            )
                        ],
                    )
                )
            ),
            metadata=stack.auth(),
        )
    ).session
    await send(stack, session.name)
    fake = await stack.runtime.next_turn()
    rules = [(r.tool_pattern, r.action) for r in fake.request.options.permission_rules]
    assert rules == [
        ("Bash", opts.PermissionRule.ACTION_ASK),
        ("*", opts.PermissionRule.ACTION_ALLOW),
    ]
    [server] = fake.request.options.mcp_servers
    assert server.http.headers["authorization"] == "Bearer s3cret"  # the runtime gets the secret
    fake.finish()


async def test_labels_follow_the_documented_rule_and_filter_sessions(stack: Stack) -> None:
    for labels, field in (
        ({"Env": "prod"}, "session.labels.Env"),  # keys start with a lowercase letter
        ({"team.name": "x"}, "session.labels.team.name"),  # no dots
        ({"env": "x" * 64}, "session.labels.env"),  # values at most 63 characters
    ):
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stack.stub.CreateSession(
                pb.CreateSessionRequest(session=session_pb2.Session(labels=labels)),
                metadata=stack.auth(),
            )
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violated_fields(bad.value) == {field}
    tagged = await stack.stub.CreateSession(
        pb.CreateSessionRequest(
            session=session_pb2.Session(labels={"env": "prod", "team_1": "x" * 63})
        ),
        metadata=stack.auth(),
    )
    await create(stack)
    found = await stack.stub.ListSessions(
        pb.ListSessionsRequest(filter='labels.env = "prod"'), metadata=stack.auth()
    )
    assert [s.name for s in found.sessions] == [tagged.session.name]


async def test_a_turn_that_cannot_be_prepared_ends_failed_and_frees_the_session(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between RUNNING and the runtime call (reading the policy, holding the budget) a failure
    ends the turn as FAILED: the session never stays RUNNING with a lease renewed for good."""
    session = await create(stack)

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the policy row is unreadable")

    monkeypatch.setattr(stack.service.runner, "_request", broken)
    await stack.stub.SendMessage(
        pb.SendMessageRequest(session=session.name, text="hi"), metadata=stack.auth("alice")
    )
    events = await collect(stack, session.name)
    result = events[-1].turn_result
    assert result.status == event_pb2.TurnResult.STATUS_FAILED
    assert result.error.reason == "TURN_ABORTED"
    assert "unreadable" not in result.error.message  # nothing of our internals
    got = await stack.stub.GetSession(
        pb.GetSessionRequest(name=session.name), metadata=stack.auth("alice")
    )
    assert got.session.state != session_pb2.Session.STATE_RUNNING
    monkeypatch.undo()
    stack.runtime.auto_reply = "ok"
    await stack.stub.SendMessage(
        pb.SendMessageRequest(session=session.name, text="again"), metadata=stack.auth("alice")
    )
    again = await collect(stack, session.name, after=events[-1].sequence)
    assert again[-1].turn_result.status == event_pb2.TurnResult.STATUS_SUCCEEDED
