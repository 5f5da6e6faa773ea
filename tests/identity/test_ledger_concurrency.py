"""The ledger under concurrency on PostgreSQL: many users of one organization reserving,
settling and releasing at once, as the session service does for every turn (a slot with a token
of budget, plus the turn's spending cap), through the real server. No call deadlocks or fails,
and every counter ends exact."""

from __future__ import annotations

import asyncio
import random

import pytest
from google.protobuf import duration_pb2

from corral.identity.v1 import identity_service_pb2 as pb
from corral.identity.v1 import role_pb2, usage_pb2
from tests.identity.conftest import IdentityFactory, bearer
from tests.identity.test_quotas import _limit
from tests.identity.world import create_user

ORG = "organizations/default"
SESSIONS = usage_pb2.USAGE_KIND_SESSIONS
TOKENS = usage_pb2.USAGE_KIND_TOKENS
COST = usage_pb2.USAGE_KIND_COST_USD_MICROS
TURNS = 50
USERS = 5


def _amounts(*pairs: tuple[int, int]) -> list[usage_pb2.UsageAmount]:
    return [usage_pb2.UsageAmount(kind=k, amount=a) for k, a in pairs]  # type: ignore[arg-type]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_concurrent_turns_of_one_organization_never_deadlock(
    make_identity: IdentityFactory,
) -> None:
    identity = await make_identity()
    root = await identity.root()
    # The session service's own credentials: the internal service account identity makes on
    # a first development start. Its calls are not throttled like a user's (50 turns make
    # 300 calls at once here).
    api_key = (identity.settings.data_dir / "service-api-key").read_text().strip()
    exchanged = await identity.stub.ExchangeApiKey(pb.ExchangeApiKeyRequest(api_key=api_key))
    auth = bearer(exchanged.token.access_token)
    # Limits make every hold a conditional update (none is reached).
    await _limit(
        identity,
        root,
        f"{ORG}/quota",
        requests_per_minute=60,  # the organisation's own members' allowance
        max_concurrent_sessions=10 * TURNS,
        tokens_per_month=10**9,
        cost_usd_micros_per_month=10**12,
    )
    users = [
        (await create_user(identity, root, ORG, role_pb2.ROLE_USER, f"u{i}")).name
        for i in range(USERS)
    ]
    for user in users:
        await _limit(identity, root, f"{user}/quota", cost_usd_micros_per_month=10**11)
    rng = random.Random(7)
    spent = [(rng.randrange(1, 500), rng.randrange(1, 5000)) for _ in range(TURNS)]

    async def turn(i: int) -> None:
        user = users[i % USERS]
        slot = await identity.stub.ReserveUsage(
            pb.ReserveUsageRequest(
                parent=ORG,
                subject=user,
                amounts=_amounts((SESSIONS, 1), (TOKENS, 1), (COST, 1)),
                ttl=duration_pb2.Duration(seconds=600),
                request_id=f"turn-{i}",
            ),
            metadata=auth,
        )
        cap = await identity.stub.ReserveUsage(
            pb.ReserveUsageRequest(
                parent=ORG,
                subject=user,
                amounts=_amounts((COST, 100_000)),
                ttl=duration_pb2.Duration(seconds=600),
                request_id=f"turn-{i}-budget",
            ),
            metadata=auth,
        )
        tokens, cost = spent[i]
        settle = pb.SettleUsageRequest(
            name=slot.usage_reservation.name,
            actual_amounts=_amounts((SESSIONS, 1), (TOKENS, tokens), (COST, cost)),
        )
        await identity.stub.SettleUsage(settle, metadata=auth)
        await identity.stub.ReleaseUsage(
            pb.ReleaseUsageRequest(name=slot.usage_reservation.name), metadata=auth
        )
        await identity.stub.ReleaseUsage(
            pb.ReleaseUsageRequest(name=cap.usage_reservation.name), metadata=auth
        )
        # What the session service's outbox does when it cannot know the first try landed.
        await identity.stub.SettleUsage(settle, metadata=auth)

    results = await asyncio.gather(*(turn(i) for i in range(TURNS)), return_exceptions=True)
    assert [r for r in results if r is not None] == []

    async def usage(subject: str) -> tuple[int, ...]:
        reply = await identity.stub.GetQuota(
            pb.GetQuotaRequest(name=f"{subject}/quota"), metadata=auth
        )
        u = reply.quota.usage
        return (
            u.concurrent_sessions,
            u.tokens,
            u.reserved_tokens,
            u.cost_usd_micros,
            u.reserved_cost_usd_micros,
        )

    total_tokens = sum(t for t, _ in spent)
    total_cost = sum(c for _, c in spent)
    assert await usage(ORG) == (0, total_tokens, 0, total_cost, 0)
    for n, user in enumerate(users):
        mine = [spent[i] for i in range(TURNS) if i % USERS == n]
        assert await usage(user) == (0, sum(t for t, _ in mine), 0, sum(c for _, c in mine), 0)
