"""Budgets bound spending: a turn holds its cap against the organisation's monthly cost budget
while it runs (concurrent turns each hold theirs, a turn that finds less left holds what is left,
one that finds nothing is refused QUOTA_EXCEEDED), the CLI is given the cap it holds and stops
itself once it is reached (BUDGET_EXCEEDED), and the settle records what was really spent.

The bound: the CLI checks its spending after each model call, so each turn overshoots its cap by
at most one model call's cost, and all the turns together spend at most the budget plus, for each
turn that ran, one model call."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from corral.identity.v1 import identity_service_pb2 as ipb
from corral.identity.v1 import quota_pb2
from corral.session.v1 import agent_policy_pb2, event_pb2
from corral.session.v1 import session_service_pb2 as spb
from tests.security.conftest import World, directive, populate
from tests.support.platform import running_platform

BUDGET = 1_800_000  # the organisation's monthly cost budget, micro-USD
CAP = 500_000  # each turn's own cap
CALL_TOKENS = 50_000  # claude-sonnet-4-5 input at 3 USD per million tokens: 0.15 USD a call
CALL_COST = 150_000
CALLS = 12  # what each turn would spend unchecked: 1.80 USD
TURNS = 6
Status = event_pb2.TurnResult


def _expensive_turn() -> str:
    """A turn that makes CALLS model calls of CALL_COST each, if nothing stops it."""
    steps: list[dict[str, object]] = []
    for i in range(CALLS - 1):
        steps.append({"usage": {"input_tokens": CALL_TOKENS, "output_tokens": 0}})
        steps.append({"tool": "Bash", "input": {"command": f"echo call {i}"}})
    steps.append({"usage": {"input_tokens": CALL_TOKENS, "output_tokens": 0}})
    steps.append({"text": "spent it all"})
    return directive(*steps)


async def _quota(world: World) -> quota_pb2.Quota:
    reply = await world.platform.identity.GetQuota(
        ipb.GetQuotaRequest(name="organizations/acme/quota"), metadata=world.auth("superuser")
    )
    return reply.quota


async def _settled(world: World) -> quota_pb2.Quota:
    """The organisation's quota once no turn holds anything (bounded: 30 s)."""
    async with asyncio.timeout(30):
        while True:
            quota = await _quota(world)
            usage = quota.usage
            if not usage.reserved_cost_usd_micros and not usage.concurrent_sessions:
                return quota
            await asyncio.sleep(0.05)


async def test_concurrent_turns_spend_at_most_the_budget_plus_one_call_each(
    tmp_path: Path,
) -> None:
    async with running_platform(tmp_path, runtime_pool_size=TURNS) as platform:
        world = await populate(platform)
        await platform.identity.UpdateQuota(
            ipb.UpdateQuotaRequest(
                quota=quota_pb2.Quota(
                    name="organizations/acme/quota", cost_usd_micros_per_month=BUDGET
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["cost_usd_micros_per_month"]),
            ),
            metadata=world.auth("superuser"),
        )
        sessions = [
            await world.new_session("user", allowed_tools=["Bash"], max_budget_usd_micros=CAP)
            for _ in range(TURNS)
        ]
        prompt = _expensive_turn()
        sent = await asyncio.gather(
            *(world.say("user", session, prompt) for session in sessions), return_exceptions=True
        )
        # A message that comes when running turns hold the whole budget is refused at once.
        for outcome in sent:
            if outcome is not None:
                assert isinstance(outcome, grpc.aio.AioRpcError), outcome
                assert outcome.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        pairs = zip(sessions, sent, strict=True)
        accepted = [session for session, outcome in pairs if outcome is None]
        results = await asyncio.gather(
            *(world.turn_results("user", session) for session in accepted)
        )
        ends = [events[-1].turn_result for events in results]

        quota = await _settled(world)
        spent = quota.usage.cost_usd_micros
        ran = [end for end in ends if end.usage.cost_usd_micros > 0]
        # The bound: the budget, plus one model call for each turn that ran.
        assert spent <= BUDGET + len(ran) * CALL_COST, (spent, [e.status for e in ends])
        # Unchecked, these turns would have spent CALLS * CALL_COST each (10.80 USD); capped
        # but not holding their caps, about TURNS * (CAP + CALL_COST) (3.60 USD): both above it.
        # Each turn stopped itself at its cap (overshooting by at most one call).
        for end in ran:
            assert end.status == Status.STATUS_BUDGET_EXCEEDED, end
            assert end.usage.cost_usd_micros <= CAP + CALL_COST
        assert ran
        # The turns that found the budget used up never started.
        for end in ends:
            if end not in ran:
                assert end.status == Status.STATUS_FAILED
                assert end.error.reason == "QUOTA_EXCEEDED"
        # The settle recorded what was really spent; nothing is held any more.
        assert spent == sum(end.usage.cost_usd_micros for end in ends)
        assert quota.usage.reserved_cost_usd_micros == 0


async def test_a_turn_that_finds_less_budget_left_than_its_cap_holds_what_is_left(
    tmp_path: Path,
) -> None:
    async with running_platform(tmp_path) as platform:
        world = await populate(platform)
        left = 250_000  # less than the cap
        await platform.identity.UpdateQuota(
            ipb.UpdateQuotaRequest(
                quota=quota_pb2.Quota(
                    name="organizations/acme/quota", cost_usd_micros_per_month=left
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["cost_usd_micros_per_month"]),
            ),
            metadata=world.auth("superuser"),
        )
        session = await world.new_session("user", allowed_tools=["Bash"], max_budget_usd_micros=CAP)
        await world.say("user", session, _expensive_turn())
        [*_, end] = await world.turn_results("user", session)
        result = end.turn_result
        # It ran with the remaining budget as its cap, and the CLI stopped at it.
        assert result.status == Status.STATUS_BUDGET_EXCEEDED
        assert left <= result.usage.cost_usd_micros <= left + CALL_COST
        quota = await _settled(world)
        assert quota.usage.cost_usd_micros == result.usage.cost_usd_micros
        assert quota.usage.cost_usd_micros <= left + CALL_COST

        # Now nothing is left: the next message is refused.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await world.say("user", session, _expensive_turn())
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await _settled(world)).usage.cost_usd_micros == quota.usage.cost_usd_micros


async def test_a_turn_without_a_cap_of_its_own_gets_its_organizations_or_the_default(
    tmp_path: Path,
) -> None:
    default = 300_000
    async with running_platform(
        tmp_path, session_default_turn_budget_usd=default / 1_000_000
    ) as platform:
        world = await populate(platform)
        # No cap anywhere but the deployment's default.
        session = await world.new_session("user", allowed_tools=["Bash"])
        await world.say("user", session, _expensive_turn())
        [*_, end] = await world.turn_results("user", session)
        assert end.turn_result.status == Status.STATUS_BUDGET_EXCEEDED
        assert default <= end.turn_result.usage.cost_usd_micros <= default + CALL_COST

        # The organisation's per-turn budget replaces it.
        policy_cap = 450_000
        await platform.sessions.UpdateAgentPolicy(
            spb.UpdateAgentPolicyRequest(
                agent_policy=agent_policy_pb2.AgentPolicy(
                    name="organizations/acme/agentPolicy", max_turn_budget_usd_micros=policy_cap
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["max_turn_budget_usd_micros"]),
            ),
            metadata=world.auth("admin"),
        )
        session = await world.new_session("user", allowed_tools=["Bash"])
        await world.say("user", session, _expensive_turn())
        [*_, end] = await world.turn_results("user", session)
        assert end.turn_result.status == Status.STATUS_BUDGET_EXCEEDED
        assert policy_cap <= end.turn_result.usage.cost_usd_micros <= policy_cap + CALL_COST
