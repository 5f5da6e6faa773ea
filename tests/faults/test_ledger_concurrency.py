"""g. Many users of one organisation reserve, settle and release usage at once, as the session
service does for their turns (its internal service account, straight to identity, on
PostgreSQL): no deadlock, no INTERNAL, every call answered, and the ledger adds up."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable
from typing import TypeVar

import grpc
import pytest
from google.protobuf import duration_pb2

from corral.identity.v1 import identity_service_pb2 as ipb
from corral.identity.v1 import usage_pb2
from tests.faults.client import Client, Outcome, attempt, bad, tally
from tests.faults.record import record

pytestmark = pytest.mark.timeout(300)

T = TypeVar("T")

USERS = 12
ROUNDS = 6
HELD = {
    usage_pb2.USAGE_KIND_SESSIONS: 1,
    usage_pb2.USAGE_KIND_TOKENS: 2000,
    usage_pb2.USAGE_KIND_COST_USD_MICROS: 20_000,
}
USED = {
    usage_pb2.USAGE_KIND_SESSIONS: 1,
    usage_pb2.USAGE_KIND_TOKENS: 700,
    usage_pb2.USAGE_KIND_COST_USD_MICROS: 7_000,
}
LARGE = 10**12


def _amounts(amounts: dict[int, int]) -> list[usage_pb2.UsageAmount]:
    return [usage_pb2.UsageAmount(kind=k, amount=v) for k, v in amounts.items()]


def settles(round_: int) -> bool:
    """Two rounds in three settle, then release; the third only releases."""
    return round_ % 3 != 2


async def test_ledger_under_concurrent_users_of_one_organisation(client: Client) -> None:
    topology = client.topology
    accounts = topology.accounts
    assert accounts is not None
    organization = accounts.organization
    users = await client.new_users(USERS, "ledger")
    # Limits on the organisation and on each user: every hold checks (and locks) both counters.
    await client.set_quota(
        f"{organization}/quota",
        max_concurrent_sessions=LARGE,
        tokens_per_month=LARGE,
        cost_usd_micros_per_month=LARGE,
    )
    await asyncio.gather(
        *(
            client.set_quota(
                f"{u.name}/quota",
                max_concurrent_sessions=1000,
                tokens_per_month=LARGE,
                cost_usd_micros_per_month=LARGE,
            )
            for u in users
        )
    )
    # The services' own identity: their internal account's API key, as the session service.
    ledger = client.identity(topology.identity.target)
    exchanged = await ledger.ExchangeApiKey(
        ipb.ExchangeApiKeyRequest(api_key=accounts.service_api_key), timeout=30
    )
    auth = (("authorization", f"Bearer {exchanged.token.access_token}"),)
    calls: list[Outcome] = []

    async def call(what: str, rpc: Awaitable[T]) -> T | None:
        outcome, answer = await attempt(what, rpc)
        calls.append(outcome)
        return answer

    async def worker(subject: str) -> None:
        for round_ in range(ROUNDS):
            reserved = await call(
                "ReserveUsage",
                ledger.ReserveUsage(
                    ipb.ReserveUsageRequest(
                        parent=organization,
                        subject=subject,
                        amounts=_amounts(HELD),
                        reference=f"faults/ledger/{round_}",
                        ttl=duration_pb2.Duration(seconds=600),
                        request_id=str(uuid.uuid4()),
                    ),
                    metadata=auth,
                    timeout=30,
                ),
            )
            if reserved is None:
                continue
            name = reserved.usage_reservation.name
            if settles(round_):
                request = ipb.SettleUsageRequest(name=name, actual_amounts=_amounts(USED))
                await call("SettleUsage", ledger.SettleUsage(request, metadata=auth, timeout=30))
            release = ipb.ReleaseUsageRequest(name=name)
            await call("ReleaseUsage", ledger.ReleaseUsage(release, metadata=auth, timeout=30))

    started = time.monotonic()
    await asyncio.gather(*(worker(u.name) for u in users))
    elapsed = time.monotonic() - started

    settled_rounds = sum(settles(r) for r in range(ROUNDS))
    wrong = []
    for user in users:
        usage = (await client.quota(f"{user.name}/quota")).usage
        expected = (0, 0, 0, settled_rounds * 700, settled_rounds * 7000)
        got = (
            usage.concurrent_sessions,
            usage.reserved_tokens,
            usage.reserved_cost_usd_micros,
            usage.tokens,
            usage.cost_usd_micros,
        )
        if got != expected:
            wrong.append(f"{user.name}: (held sessions, tokens, cost; used tokens, cost) {got}")
    record(
        "g_ledger_concurrency",
        seconds=elapsed,
        calls=tally(calls),
        users=USERS,
        rounds=ROUNDS,
        ledgers_wrong=len(wrong),
    )
    assert not bad(calls), bad(calls)
    refused = [str(o) for o in calls if o.code != grpc.StatusCode.OK]
    assert not refused, (tally(calls), refused[:5])
    assert not wrong, wrong
