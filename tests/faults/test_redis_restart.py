"""d. Redis restarts (stopped, then started again empty: no persistence) while a turn streams to
watchers on both replicas: the streams recover and every watcher gets every event exactly once;
live fan-out across replicas works again; no call answers INTERNAL."""

from __future__ import annotations

import time

import pytest

from corral.session.v1 import event_pb2
from corral.session.v1 import session_service_pb2 as spb
from tests.faults.client import (
    QUICK,
    SUCCEEDED,
    Client,
    Prober,
    Watcher,
    attempt,
    bad,
    noted,
    same_events,
    streamed_text,
    tally,
    until,
)
from tests.faults.record import record

pytestmark = pytest.mark.timeout(300)

WRITTEN_WHILE_DOWN = 20  # events (a delta every 0.25 s)


async def test_redis_restarted_mid_stream(client: Client) -> None:
    topology = client.topology
    driver, other = topology.sessions[0], topology.sessions[1]
    user, prober_user = await client.new_users(2, "redis-restart")
    session = await client.new_session(user, driver.target)
    turn = await client.send(user, session, streamed_text(20), driver.target)
    # One watcher on the replica that does not run the turn (its live events come through
    # Redis), one through the edge.
    watchers = [
        Watcher(client, user, session, [other.target]).start(),
        Watcher(client, user, session, [topology.edge]).start(),
    ]
    prober = Prober(client, prober_user, await client.new_session(prober_user))
    problems: list[str] = []
    measured: dict[str, object] = {}
    try:
        await watchers[0].streaming(turn, within=90)
        prober.start()
        stopped_at = watchers[0].last_sequence
        started = time.monotonic()
        await topology.redis.stop()

        async def progressed() -> bool | None:
            """The turn went on while Redis was down (the session's last_sequence, read from
            the database)."""
            get = client.sessions(driver.target).GetSession(
                spb.GetSessionRequest(name=session), metadata=user.auth, timeout=5
            )
            _, got = await attempt("GetSession", get)
            return (
                True
                if got and got.session.last_sequence >= stopped_at + WRITTEN_WHILE_DOWN
                else None
            )

        # Redis stays down (about 5 s) until the turn has written events it could not publish.
        await noted(problems, until(progressed, within=30, what="the turn going on without Redis"))
        topology.redis.start()
        await topology.redis.ready()
        measured["redis_down_s"] = time.monotonic() - started
        back = time.monotonic()

        get = client.sessions(driver.target).GetSession(
            spb.GetSessionRequest(name=session), metadata=user.auth, timeout=10
        )
        _, got = await attempt("GetSession", get)
        written = got.session.last_sequence if got else stopped_at + WRITTEN_WHILE_DOWN
        for i, watcher in enumerate(watchers):
            caught_up = watcher.until(
                lambda e: e.sequence >= written,
                within=60,
                what=f"watcher {i} seeing the events written while Redis was down",
            )
            if await noted(problems, caught_up) is not None:
                measured[f"watcher{i}_caught_up_s"] = time.monotonic() - back
        for watcher in watchers:
            result = await noted(problems, watcher.result_of(turn, within=90))
            if result is not None and result.status != SUCCEEDED:
                problems.append(f"the turn ended {event_pb2.TurnResult.Status.Name(result.status)}")
        sent = time.monotonic()
        after = await client.send(user, session, QUICK, driver.target)
        if await noted(problems, watchers[0].result_of(after, within=90)) is not None:
            measured["next_turn_on_other_replica_s"] = time.monotonic() - sent
        await prober.stop()
        history = await client.history(user, session)
        for i, watcher in enumerate(watchers):
            await noted(problems, watcher.caught_up())
            await watcher.stop()
            problems += [f"watcher {i}: {p}" for p in watcher.duplicates_or_gaps()]
            problems += [f"watcher {i}: {p}" for p in same_events(watcher.events, history)]
            if watcher.last_sequence != history[-1].sequence:
                problems.append(
                    f"watcher {i} saw up to {watcher.last_sequence} of {history[-1].sequence}"
                )
            problems += [f"watcher {i}'s stream ended {line}" for line in bad(watcher.endings)]
        problems += [f"a call answered {line}" for line in bad(prober.outcomes)]
        record(
            "d_redis_restart",
            **measured,
            calls=tally(prober.outcomes),
            stream_endings=[str(e) for w in watchers for e in w.endings],
            problems=len(problems),
        )
    finally:
        await prober.stop()
        for watcher in watchers:
            await watcher.stop()
    assert not problems, problems
