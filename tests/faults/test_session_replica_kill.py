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
    measured: dict[str, object] = {}
    try:
        await watcher.streaming(turn, within=90)
        last_before = watcher.last_sequence
        killed = time.monotonic()
        await doomed.kill()

        resumed = watcher.until(
            lambda e: e.sequence > last_before,
            within=60,
            what="an event after the kill, on the other replica",
        )
        if await noted(problems, resumed) is not None:
            measured["resumed_on_other_replica_s"] = time.monotonic() - killed
        result = await noted(problems, watcher.result_of(turn, within=90))
        if result is not None:
            measured["turn_ended_s"] = time.monotonic() - killed
            measured["turn_status"] = event_pb2.TurnResult.Status.Name(result.status)
            measured["turn_error"] = result.error.reason
        got = await client.sessions(other.target).GetSession(
            spb.GetSessionRequest(name=session), metadata=user.auth, timeout=10
        )
        state = session_pb2.Session.State.Name(got.session.state)
        if state in ("STATE_RUNNING", "STATE_AWAITING_PERMISSION"):
            problems.append(f"the session is still {state} after the kill")
        else:
            after = await client.send(user, session, QUICK)
            next_result = await noted(problems, watcher.result_of(after, within=90))
            if next_result is not None:
                measured["session_usable_s"] = time.monotonic() - killed
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
            **measured,
            streams_opened=watcher.streams,
            stream_endings=[str(e) for e in watcher.endings],
            problems=len(problems),
        )
    finally:
        await watcher.stop()
        await topology.restart(doomed)
    assert not problems, problems
