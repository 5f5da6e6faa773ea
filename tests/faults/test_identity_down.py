"""e. Identity is down when a turn ends (killed mid-turn, started again after the turn ended): once
it is back, the turn's usage is settled (the user's usage report shows its tokens and cost) and
nothing stays held (no open reservation on the user's quota)."""

from __future__ import annotations

import time

import pytest

from corral.session.v1 import event_pb2
from tests.faults.client import (
    SUCCEEDED,
    Client,
    Outcome,
    Watcher,
    attempt,
    bad,
    noted,
    streamed_text,
    until,
)
from tests.faults.record import record

pytestmark = pytest.mark.timeout(300)

TOKENS = (1200, 800)  # what the offline model reports for the turn (input, output)


async def test_identity_down_when_a_turn_ends(client: Client) -> None:
    topology = client.topology
    identity = topology.identity
    (user,) = await client.new_users(1, "identity-down")
    session = await client.new_session(user)
    before = (await client.usage(user.name)).usage_report.totals
    turn = await client.send(user, session, streamed_text(4, tokens=TOKENS))
    watcher = Watcher(client, user, session, [topology.edge]).start()
    problems: list[str] = []
    measured: dict[str, object] = {}
    calls: list[Outcome] = []
    try:
        await watcher.streaming(turn, within=90)
        killed = time.monotonic()
        await identity.kill()
        result = await watcher.result_of(turn, within=60)
        measured["turn_ended_after_kill_s"] = time.monotonic() - killed
        if result.status != SUCCEEDED:
            problems.append(f"the turn ended {event_pb2.TurnResult.Status.Name(result.status)}")
        usage = result.usage
        tokens = sum(
            (
                usage.input_tokens,
                usage.output_tokens,
                usage.cache_read_input_tokens,
                usage.cache_creation_input_tokens,
            )
        )
        assert tokens >= sum(TOKENS) and usage.cost_usd_micros > 0, usage

        identity.start()
        await identity.ready()
        back = time.monotonic()
        measured["identity_down_s"] = back - killed

        async def settled() -> bool | None:
            outcome, report = await attempt("GetUsageReport", client.usage(user.name))
            calls.append(outcome)
            if report is None:  # the edge has not seen identity back yet
                return None
            totals = report.usage_report.totals
            done = (
                totals.tokens - before.tokens == tokens
                and totals.cost_usd_micros - before.cost_usd_micros == usage.cost_usd_micros
            )
            return True if done else None

        what = f"the turn's {tokens} tokens and {usage.cost_usd_micros} micro-USD settled"
        if await noted(problems, until(settled, within=60, what=what, every=0.5)):
            measured["settled_after_identity_back_s"] = time.monotonic() - back

        async def released() -> bool | None:
            outcome, quota = await attempt("GetQuota", client.quota(f"{user.name}/quota"))
            calls.append(outcome)
            if quota is None:
                return None
            held = quota.usage
            free = not (held.concurrent_sessions or held.reserved_tokens)
            return True if free and not held.reserved_cost_usd_micros else None

        if await noted(
            problems, until(released, within=20, what="no usage held for the user", every=0.5)
        ):
            measured["released_after_identity_back_s"] = time.monotonic() - back
        problems += [f"a call answered {line}" for line in bad(calls)]
        quota = await client.quota(f"{user.name}/quota")
        totals = (await client.usage(user.name)).usage_report.totals
        record(
            "e_identity_down_at_turn_end",
            **measured,
            turn_tokens=tokens,
            turn_cost_usd_micros=usage.cost_usd_micros,
            settled_tokens=totals.tokens - before.tokens,
            settled_cost_usd_micros=totals.cost_usd_micros - before.cost_usd_micros,
            held_concurrent_sessions=quota.usage.concurrent_sessions,
            held_tokens=quota.usage.reserved_tokens,
            held_cost_usd_micros=quota.usage.reserved_cost_usd_micros,
        )
    finally:
        await watcher.stop()
    assert not problems, problems
