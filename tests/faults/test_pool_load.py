"""f. Twenty users each send a turn at once to a runtime whose pool holds 8 agent processes: turns
beyond the pool wait for a process, and every one of them succeeds."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import grpc
import pytest

from corral.session.v1 import event_pb2
from tests.faults.client import Client, Outcome, User, attempt, bad, tally
from tests.faults.conftest import POOL_SIZE
from tests.faults.record import record
from tests.support.platform import directive

pytestmark = pytest.mark.timeout(300)

USERS = 20


async def test_twenty_users_on_a_pool_of_eight(client: Client) -> None:
    assert USERS > POOL_SIZE
    users = await client.new_users(USERS, "pool")
    sessions = await asyncio.gather(*(client.new_session(u) for u in users))
    # Each answer streams for about 2 s, so the turns overlap and the pool is full.
    text = directive({"text": "busy " * 16, "chunk": 4, "delay": 0.1})
    started = time.monotonic()
    sends = await asyncio.gather(
        *(
            attempt("SendMessage", client.send(u, s, text))
            for u, s in zip(users, sessions, strict=True)
        )
    )
    calls: list[Outcome] = [outcome for outcome, _ in sends]
    turns = [(user, turn) for user, (_, turn) in zip(users, sends, strict=True) if turn]
    durations: list[float] = []

    async def finish(user: User, name: str) -> event_pb2.TurnResult | None:
        try:
            outcome, turn = await attempt(
                "GetTurn", client.finished_turn(user, name, within=150, every=1.0)
            )
        except AssertionError:  # not finished in time
            return None
        calls.append(outcome)
        durations.append(time.monotonic() - started)
        return turn.result if turn else None

    results = await asyncio.gather(*(finish(u, t.name) for u, t in turns))
    statuses = Counter(
        event_pb2.TurnResult.Status.Name(r.status) if r else "NOT_FINISHED" for r in results
    )
    reasons = Counter(r.error.reason for r in results if r and r.error.reason)
    record(
        "f_pool_20_users_8_processes",
        all_finished_s=max(durations, default=0.0),
        accepted=len(turns),
        statuses=dict(statuses),
        failure_reasons=dict(reasons),
        calls=tally(calls),
    )
    assert not bad(calls), bad(calls)
    refused = [str(o) for o in calls if o.code != grpc.StatusCode.OK]
    assert not refused, refused
    assert statuses == {"STATUS_SUCCEEDED": USERS}, (statuses, reasons)
