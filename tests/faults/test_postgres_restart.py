"""c. PostgreSQL restarts (``pg_ctl restart -m fast``) in the middle of a turn: no call answers
INTERNAL (UNAVAILABLE is fine while it is down), no turn is left RUNNING afterwards, and nothing
acknowledged is lost (the events streamed before, the sessions created)."""

from __future__ import annotations

import time

import grpc
import pytest

from corral.session.v1 import event_pb2
from corral.session.v1 import session_service_pb2 as spb
from tests.faults.client import (
    QUICK,
    SUCCEEDED,
    Client,
    Prober,
    Watcher,
    bad,
    noted,
    outcome_of,
    same_events,
    streamed_text,
    tally,
    until,
)
from tests.faults.record import record

pytestmark = pytest.mark.timeout(300)


async def test_postgres_restarted_mid_turn(client: Client) -> None:
    topology = client.topology
    user, prober_user = await client.new_users(2, "postgres-restart")
    session = await client.new_session(user)
    # Events every 50 ms: the restart lands while the turn's driver writes them.
    turn = await client.send(user, session, streamed_text(20, every=0.05))
    watcher = Watcher(client, user, session, [topology.edge]).start()
    prober = Prober(client, prober_user, await client.new_session(prober_user))
    problems: list[str] = []
    measured: dict[str, object] = {}
    try:
        await watcher.streaming(turn, within=90)
        prober.start()
        seen_before = list(watcher.events)
        started = time.monotonic()
        await topology.postgres.restart("fast")
        measured["postgres_back_s"] = time.monotonic() - started

        async def reads_again() -> bool | None:
            get = client.sessions().GetSession(
                spb.GetSessionRequest(name=session), metadata=user.auth, timeout=5
            )
            outcome = await outcome_of("GetSession via the edge", get)
            prober.outcomes.append(outcome)
            return True if outcome.code == grpc.StatusCode.OK else None

        if await noted(problems, until(reads_again, within=60, what="GetSession OK again")):
            measured["reads_ok_s"] = time.monotonic() - started
        finished = await noted(problems, client.finished_turn(user, turn.name, within=60))
        if finished is None:
            problems.append(f"{turn.name} is not FINISHED 60 s after PostgreSQL came back")
        else:
            measured["turn_ended_s"] = time.monotonic() - started
            measured["turn_result"] = event_pb2.TurnResult.Status.Name(finished.result.status)
            measured["turn_error"] = finished.result.error.reason
            after = await client.send(user, session, QUICK)
            next_result = await noted(problems, watcher.result_of(after, within=90))
            measured["session_usable_s"] = time.monotonic() - started
            if next_result is not None and next_result.status != SUCCEEDED:
                problems.append(f"the next turn ended {next_result}")
        await prober.stop()
        history = await noted(problems, watcher.caught_up()) or await client.history(user, session)
        await watcher.stop()

        problems += [f"a call answered {line}" for line in bad(prober.outcomes)]
        problems += [f"a stream ended {line}" for line in bad(watcher.endings)]
        problems += same_events(seen_before, history)
        problems += same_events(watcher.events, history)
        problems += watcher.duplicates_or_gaps()
        kept = await client.session_names(prober_user)
        lost = [name for name in prober.created if name not in kept]
        if lost:
            problems.append(f"sessions acknowledged while PostgreSQL restarted are lost: {lost}")
        record(
            "c_postgres_restart",
            **measured,
            calls=tally(prober.outcomes),
            stream_endings=[str(e) for e in watcher.endings],
            problems=len(problems),
        )
    finally:
        await prober.stop()
        await watcher.stop()
    assert not problems, problems
