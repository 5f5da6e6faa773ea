"""b. The session replica that runs a turn and serves its watcher is killed (-9) mid-stream: the
client resumes on the other replica from the last sequence it saw and gets every event exactly
once; the turn is ended (not left RUNNING) and the session takes the next message."""

from __future__ import annotations

import time

import pytest

from corral.session.v1 import event_pb2, session_pb2
from corral.session.v1 import session_service_pb2 as spb
from tests.faults.client import (
    QUICK,
    SUCCEEDED,
    Client,
    Watcher,
    noted,
    same_events,
    streamed_text,
)
from tests.faults.record import record

pytestmark = pytest.mark.timeout(300)


async def test_session_replica_killed_mid_stream(client: Client) -> None:
    topology = client.topology
    doomed, other = topology.sessions[0], topology.sessions[1]
    (user,) = await client.new_users(1, "replica-kill")
    session = await client.new_session(user, doomed.target)
    # Sent to the doomed replica: it drives the turn (only it holds the sender's token).
    turn = await client.send(user, session, streamed_text(30), doomed.target)
    watcher = Watcher(client, user, session, [doomed.target, other.target]).start()
    problems: list[str] = []
    try:
        await watcher.streaming(turn, within=90)
        seen_before = len(watcher.events)
        killed = time.monotonic()
        await doomed.kill()

        await watcher.until(
            lambda e: e.sequence > watcher.events[seen_before - 1].sequence,
            within=60,
            what="an event after the kill, on the other replica",
        )
        resumed = time.monotonic() - killed
        result = await watcher.result_of(turn, within=90)
        turn_ended = time.monotonic() - killed
        finished = await client.finished_turn(user, turn.name, within=30, target=other.target)
        got = await client.sessions(other.target).GetSession(
            spb.GetSessionRequest(name=session), metadata=user.auth, timeout=10
        )
        if got.session.state in (
            session_pb2.Session.STATE_RUNNING,
            session_pb2.Session.STATE_AWAITING_PERMISSION,
        ):
            problems.append(f"the session is still {got.session.state} after its turn ended")

        after = await client.send(user, session, QUICK)
        next_result = await watcher.result_of(after, within=90)
        usable = time.monotonic() - killed
        if next_result.status != SUCCEEDED:
            problems.append(f"the next turn ended {next_result}")

        history = await noted(problems, watcher.caught_up()) or await client.history(user, session)
        await watcher.stop()
        problems += watcher.duplicates_or_gaps()
        problems += same_events(watcher.events, history)
        if [e.sequence for e in history] != [e.sequence for e in watcher.events]:
            problems.append(
                f"the watcher saw sequences up to {watcher.last_sequence} ({len(watcher.events)}"
                f" events), the history holds {len(history)}"
            )
        record(
            "b_session_replica_kill",
            resumed_on_other_replica_s=resumed,
            turn_ended_s=turn_ended,
            session_usable_s=usable,
            turn_status=event_pb2.TurnResult.Status.Name(result.status),
            turn_error=result.error.reason,
            streams_opened=watcher.streams,
            stream_endings=[str(e) for e in watcher.endings],
        )
        assert finished.state == finished.STATE_FINISHED
    finally:
        await watcher.stop()
        await topology.restart(doomed)
    assert not problems, problems
