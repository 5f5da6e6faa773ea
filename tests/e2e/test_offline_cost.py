"""The offline model's turns cost nothing unless a price is configured: its costs are invented
(the CLI prices the tokens at Claude's list prices), so by default they never spend a budget,
and the runtime says so when it starts the stand-in. CORRAL_OFFLINE_MODEL_PRICING=list keeps
the list-price costs (the rest of the suite runs that way)."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.client import Client
from corral.session.v1 import event_pb2
from tests.support.platform import directive, running_platform, until_turn_over


async def one_turn_usage(
    tmp_path: Path, pricing: str, tokens: tuple[int, int] = (20_000, 5_000)
) -> tuple[int, int, int, int]:
    """(status, output tokens, turn cost, session cost) of one scripted turn, in micro-USD."""
    async with running_platform(tmp_path, offline_model_pricing=pricing) as platform:
        targets = {n: platform.settings.target_for(n) for n in ("identity", "session")}
        async with Client(targets, token=platform.token) as corral:
            session = await corral.create_session("cost")
            usage = {"usage": {"input_tokens": tokens[0], "output_tokens": tokens[1]}}
            turn = await corral.send_message(session.name, directive(usage, {"text": "ok"}))
            events = [e async for e in corral.turn_events(session.name, turn)]
            result = events[-1].turn_result
            await until_turn_over(platform, session.name)
            after = await corral.get_session(session.name)
        return (
            result.status,
            result.usage.output_tokens,
            result.usage.cost_usd_micros,
            after.usage.cost_usd_micros,
        )


async def test_offline_turns_cost_nothing_by_default(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    status, tokens, turn_cost, session_cost = await one_turn_usage(tmp_path, "free")
    assert status == event_pb2.TurnResult.STATUS_SUCCEEDED
    assert tokens == 5_000  # tokens are still counted
    assert (turn_cost, session_cost) == (0, 0)
    assert any("cost nothing" in r.getMessage() for r in caplog.records)


async def test_invented_costs_stop_no_turn(tmp_path: Path) -> None:
    """At list prices these tokens cost $1.35, over the default $1 turn budget; at no price
    the CLI is given no budget to stop at, so the turn runs to its end."""
    free = await one_turn_usage(tmp_path / "free", "free", tokens=(200_000, 50_000))
    assert free[0] == event_pb2.TurnResult.STATUS_SUCCEEDED and free[2] == 0
    listed = await one_turn_usage(tmp_path / "list", "list", tokens=(200_000, 50_000))
    assert listed[0] == event_pb2.TurnResult.STATUS_BUDGET_EXCEEDED


async def test_a_configured_price_is_charged(tmp_path: Path) -> None:
    status, tokens, turn_cost, session_cost = await one_turn_usage(tmp_path, "list")
    assert status == event_pb2.TurnResult.STATUS_SUCCEEDED
    assert tokens == 5_000
    # Claude Sonnet's list prices: $3 per million input tokens, $15 per million output tokens.
    assert turn_cost >= 20_000 * 3 + 5_000 * 15
    assert session_cost == turn_cost
