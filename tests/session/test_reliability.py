"""No stuck turns, no lost usage, clients told to reconnect.

- A turn whose driver dies (a failure in the session service itself, or a cancellation from
  within) is ended FAILED (TURN_ABORTED) at once, what it held is given back, its runtime turn
  interrupted, and the session's next turn runs.
- A turn's usage goes through the outbox: with identity down when the turn ends, the session is
  free at once and the tokens and cost are settled (as the service, not with the user's token)
  once identity answers; a retry settles nothing twice.
- A process restarted under its name (host and port) ends the turns its previous run left at
  once, and their usage settles later, without an error logged.
- A server that stops gracefully ends its event streams UNAVAILABLE (STREAM_RESTART, with a
  RetryInfo), interrupts its running turns and records what they cost.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from corral.libs.auth import StaticJwksSource, TokenVerifier
from corral.libs.auth.caller import Caller
from corral.libs.grpc.interceptors import AuthenticationHook
from corral.libs.grpc.server import CorralServer, ServerConfig
from corral.services.session import events as event_mapping
from corral.services.session.domain import BusyStrategy, Usage, now
from corral.services.session.main import instance_name
from corral.session.v1 import agent_options_pb2, event_pb2, session_pb2
from corral.session.v1 import session_service_pb2 as pb
from corral.session.v1 import session_service_pb2_grpc as rpc
from tests.session.conftest import ACME, Stack
from tests.session.test_session_stream import collect, create, detail, reason, send
from tests.support.keys import AUDIENCE, ISSUER

ENQUEUE = pb.SendMessageRequest.BUSY_STRATEGY_ENQUEUE


async def _session_state(stack: Stack, name: str) -> int:
    reply = await stack.stub.GetSession(pb.GetSessionRequest(name=name), metadata=stack.auth())
    return int(reply.session.state)


def _results(events: list[event_pb2.SessionEvent]) -> list[event_pb2.TurnResult]:
    return [e.turn_result for e in events if e.HasField("turn_result")]


@pytest.mark.parametrize("failure", [RuntimeError("a bug"), asyncio.CancelledError()])
async def test_a_turn_whose_driver_dies_is_ended_and_the_session_goes_on(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    session = await create(stack)
    first = (await send(stack, session.name, "first")).turn
    await send(stack, session.name, "second", strategy=ENQUEUE)
    fake = await stack.runtime.next_turn()
    mapping = event_mapping.from_runtime

    def broken(event: Any) -> Any:
        if event.HasField("text_delta") and event.text_delta.text == "boom":
            raise failure  # the session service fails while it handles the turn's events
        return mapping(event)

    monkeypatch.setattr(event_mapping, "from_runtime", broken)
    fake.text("boom")

    second = await stack.runtime.next_turn()  # the dead turn was ended, the next one runs
    assert first.name.endswith(fake.id)
    assert stack.runtime.interrupted == [fake.id]  # the runtime was told to stop the first
    second.text("fine")
    second.finish()
    events = await collect(stack, session.name, until="turn_result", count=2)
    ended, done = _results(events)
    assert ended.status == event_pb2.TurnResult.STATUS_FAILED
    assert ended.error.reason == "TURN_ABORTED"
    assert done.status == event_pb2.TurnResult.STATUS_SUCCEEDED
    assert await _session_state(stack, session.name) == session_pb2.Session.STATE_IDLE
    # Both turns' slots and budget holds are given back; the dead one settled what it knew.
    await stack.ledger.wait(lambda: not stack.ledger.held and not stack.ledger.budget_holds)
    assert len(stack.ledger.settled) == 2


async def test_identity_down_at_turn_end_delays_the_settle_and_never_loses_it(
    stack: Stack,
) -> None:
    session = await create(stack)
    turn = (await send(stack, session.name)).turn
    fake = await stack.runtime.next_turn()
    stack.ledger.down = True  # identity stops answering before the turn ends
    fake.finish(tokens=7, cost=1234)
    await collect(stack, session.name)
    await stack.service.outbox.settle()  # the immediate attempt failed
    assert stack.ledger.settled == []
    # The session is free at once: the next message is accepted (not SESSION_BUSY).
    assert await _session_state(stack, session.name) == session_pb2.Session.STATE_IDLE
    reservation = next(iter(stack.ledger.held))
    assert reservation  # the slot is still held while identity is away

    moment = [now()]
    replica = stack.make_service(clock=lambda: moment[0])  # any replica's retry loop
    try:
        moment[0] = now() + timedelta(minutes=1)
        assert await replica.outbox.drain() == 0  # identity is still down
        stack.ledger.down = False
        moment[0] = now() + timedelta(hours=1)
        attempts = stack.ledger.attempts
        assert await replica.outbox.drain() == 1  # identity is back: settled, slot released
        assert stack.ledger.tokens[attempts:] == [""] * (len(stack.ledger.tokens) - attempts)
        moment[0] = now() + timedelta(hours=2)
        assert await replica.outbox.drain() == 0  # delivered once, never again
    finally:
        await replica.close()
    assert stack.ledger.settled == [(reservation, Usage(7, 7, 0, 0, 1234))]
    assert not stack.ledger.held and not stack.ledger.budget_holds
    got = await stack.stub.GetTurn(pb.GetTurnRequest(name=turn.name), metadata=stack.auth())
    assert got.turn.usage.cost_usd_micros == 1234


async def test_a_restarted_process_ends_its_previous_runs_turns_at_once(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caller = Caller(f"{ACME}/users/alice", ACME, frozenset({"user"}), token=stack.token("alice"))
    before = stack.make_service(instance="host-a:50052")
    session = await before.create_session(
        caller,
        display_name="",
        options=agent_options_pb2.AgentOptions(),
        labels={},
        organization="",
        request_id="",
    )
    await before.send_message(
        caller, session.id, text="running", request_id="", strategy=BusyStrategy.REJECT
    )
    await before.send_message(
        caller, session.id, text="queued", request_id="", strategy=BusyStrategy.ENQUEUE
    )
    fake = await stack.runtime.next_turn()
    fake.text("partial")
    await collect(stack, session.name, until="text_block")
    await before.close(graceful=False)  # kill -9: nothing is ended, nothing is released
    stack.ledger.down = True  # and identity is not up yet when the process comes back

    caplog.set_level(logging.INFO)
    after = stack.make_service(instance="host-a:50052")  # the same host and port
    try:
        await after.recover()  # the first thing its background sweep does
        events = await collect(stack, session.name, until="turn_result", count=2)
        running, queued = _results(events)
        assert (running.status, running.error.reason) == (
            event_pb2.TurnResult.STATUS_FAILED,
            "TURN_ABORTED",
        )
        assert "restarted" in running.error.message
        assert queued.error.reason == "TURN_NOT_RUN"
        got = await stack.stub.GetSession(
            pb.GetSessionRequest(name=session.name), metadata=stack.auth()
        )
        assert got.session.state == session_pb2.Session.STATE_FAILED  # not busy: it goes on
        await after.outbox.settle()
        assert stack.ledger.held  # their usage waits for identity
        assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []

        stack.ledger.down = False
        later = now() + timedelta(hours=1)
        drainer = stack.make_service(clock=lambda: later)
        try:
            assert await drainer.outbox.drain() >= 2  # one per turn (and any audit entry)
        finally:
            await drainer.close()
        assert not stack.ledger.held and not stack.ledger.budget_holds
    finally:
        await after.close()


async def test_a_stopping_server_tells_watchers_to_reconnect_and_records_what_turns_cost(
    stack: Stack,
) -> None:
    """Replica B stops gracefully while a client watches a turn it runs: the stream ends
    UNAVAILABLE (STREAM_RESTART) with a retry delay, the turn is interrupted and its cost
    recorded, and the client, reconnecting to replica A with its last sequence, sees the rest
    exactly once."""
    wired = stack.make_wiring()
    verifier = TokenVerifier(StaticJwksSource(stack.key.jwks()), issuer=ISSUER, audience=AUDIENCE)
    server = CorralServer(
        ServerConfig(name="session", hooks=[AuthenticationHook(verifier)], tracing=False),
        [wired.registration],
    )
    await server.start()
    channel = grpc.aio.insecure_channel(server.address)
    b = rpc.SessionServiceStub(channel)
    try:
        created = await b.CreateSession(
            pb.CreateSessionRequest(session=session_pb2.Session()), metadata=stack.auth()
        )
        name = created.session.name
        await b.SendMessage(pb.SendMessageRequest(session=name, text="hi"), metadata=stack.auth())
        fake = await stack.runtime.next_turn()
        fake.text("half way")
        seen: list[event_pb2.SessionEvent] = []
        stream = b.StreamSessionEvents(
            pb.StreamSessionEventsRequest(session=name), metadata=stack.auth()
        )
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async with asyncio.timeout(10):
                async for response in stream:
                    if response.event.HasField("heartbeat"):
                        continue
                    seen.append(response.event)
                    if response.event.HasField("text_block"):
                        await server.stop(5)  # SIGTERM: NOT_SERVING, drain, stop
                        await wired.service.close()
    finally:
        await channel.close()
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert reason(ended.value) == "STREAM_RESTART"
    assert detail(ended.value, error_details_pb2.RetryInfo) is not None

    rest = await collect(stack, name, after=seen[-1].sequence)  # replica A
    everything = seen + rest
    assert [e.sequence for e in everything] == list(range(1, len(everything) + 1))
    [result] = _results(everything)
    assert result.status == event_pb2.TurnResult.STATUS_INTERRUPTED
    assert result.usage.cost_usd_micros == 500  # what the interrupted turn cost
    await stack.ledger.wait_settled()
    assert stack.ledger.settled[0][1].cost_usd_micros == 500
    assert await _session_state(stack, name) == session_pb2.Session.STATE_IDLE


def test_a_process_with_a_fixed_port_is_named_after_it() -> None:
    """What lets a restarted process recognise its previous run's turns; with port 0 (tests,
    ad hoc replicas) every start is a new name."""
    assert instance_name(50052) == f"{socket.gethostname()[:50]}:50052"
    assert instance_name(0) == ""


async def test_only_turns_being_worked_on_keep_their_lease(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replica A runs two turns; one's driver dies and A cannot end it itself (its rescue is
    switched off here). A keeps renewing the live turn's lease but not the dead one's, so
    replica B's sweep ends the dead turn once its lease runs out and leaves the live one."""
    lease = 3.0
    a = stack.make_service(lease=lease)
    b = stack.make_service(lease=lease)
    monkeypatch.setattr(a.runner, "_rescue", lambda session_id: None)
    caller = Caller(f"{ACME}/users/alice", ACME, frozenset({"user"}), token=stack.token("alice"))
    sessions = []
    for _ in range(2):
        created = await a.create_session(
            caller,
            display_name="",
            options=agent_options_pb2.AgentOptions(),
            labels={},
            organization="",
            request_id="",
        )
        await a.send_message(
            caller, created.id, text="go", request_id="", strategy=BusyStrategy.REJECT
        )
        sessions.append(created)
    live, dead = await stack.runtime.next_turn(), await stack.runtime.next_turn()
    mapping = event_mapping.from_runtime

    def broken(event: Any) -> Any:
        if event.HasField("text_delta") and event.text_delta.text == "boom":
            raise RuntimeError("a bug")
        return mapping(event)

    monkeypatch.setattr(event_mapping, "from_runtime", broken)
    dead.text("boom")
    live.text("still here")
    dead_session = next(s for s in sessions if s.name == dead.request.session)
    live_session = next(s for s in sessions if s.name == live.request.session)
    try:
        async with asyncio.timeout(10 * lease):
            while await _session_state(stack, dead_session.name) != (
                session_pb2.Session.STATE_FAILED
            ):
                await b.recover()
                await asyncio.sleep(0.2)
        # Well past the first lease: the live turn's was renewed, so B left it alone.
        assert await _session_state(stack, live_session.name) == (session_pb2.Session.STATE_RUNNING)
        [ended] = _results(await collect(stack, dead_session.name))
        assert "stopped" in ended.error.message  # B: the process that ran it stopped
    finally:
        live.finish()
        await a.close()
        await b.close()
