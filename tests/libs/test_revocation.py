"""The revocation feed: the same contract in memory and on Redis, and the verifier refusing a
revoked token within one refresh interval (a driven clock, no sleeping)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import pytest

from corral.libs.auth import StaticJwksSource, TokenVerifier
from corral.libs.auth.revocation import (
    RETENTION_SECONDS,
    InMemoryRevocations,
    RedisRevocations,
    Revocation,
    RevocationList,
    RevocationStore,
)
from corral.libs.errors import Unauthenticated
from corral.libs.redis import create_redis
from tests.conftest import require_redis
from tests.support.keys import AUDIENCE, ISSUER, SigningKey

ALICE = "organizations/acme/users/alice"


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[RevocationStore]:
    if request.param == "memory":
        yield InMemoryRevocations()
        return
    client = create_redis(await require_redis())
    yield RedisRevocations(client, key=f"test:revocations:{uuid.uuid4().hex}")
    await client.aclose()


async def test_the_latest_revocation_of_a_key_wins_and_old_ones_are_pruned(
    store: RevocationStore,
) -> None:
    now = time.time()
    await store.publish(Revocation("subject", ALICE, now))
    await store.publish(Revocation("subject", ALICE, now - 100))  # late and older: ignored
    await store.publish(Revocation("api_key", "k1", now - RETENTION_SECONDS - 5))
    assert await store.snapshot() == {("subject", ALICE): now}
    with pytest.raises(ValueError, match="unknown revocation kind"):
        Revocation("everything", "x", now)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("kind", "ident", "claims"),
    [
        ("subject", ALICE, {}),
        ("organization", "organizations/acme", {}),
        ("session", "sid-1", {"sid": "sid-1"}),
        ("api_key", "key-1", {"akid": "key-1"}),
    ],
)
async def test_a_revoked_token_is_refused_within_one_refresh(
    store: RevocationStore, kind: str, ident: str, claims: dict[str, str]
) -> None:
    key = SigningKey.generate()
    clock = Clock()
    revocations = RevocationList(store, refresh_seconds=1.0, clock=clock)
    verifier = TokenVerifier(
        StaticJwksSource(key.jwks()), issuer=ISSUER, audience=AUDIENCE, revocations=revocations
    )
    issued = int(time.time()) - 10
    token = key.token(iat=issued, **claims)
    assert (await verifier.verify(token)).subject == ALICE  # cached from now on

    await store.publish(Revocation(kind, ident, issued + 1))
    assert (await verifier.verify(token)).subject == ALICE  # not re-read yet
    clock.now += 1.0
    with pytest.raises(Unauthenticated) as refused:
        await verifier.verify(token)
    assert refused.value.reason == "TOKEN_REVOKED"
    # A token issued after the revocation (a new sign-in) works.
    fresh = key.token(iat=issued + 2, **claims)
    assert (await verifier.verify(fresh)).subject == ALICE


async def test_an_unreadable_feed_keeps_the_last_snapshot() -> None:
    class Failing(InMemoryRevocations):
        broken = False

        async def snapshot(self):  # type: ignore[no-untyped-def]
            if self.broken:
                raise ConnectionError("redis is down")
            return await super().snapshot()

    feed = Failing()
    clock = Clock()
    revocations = RevocationList(feed, clock=clock)
    key = SigningKey.generate()
    verifier = TokenVerifier(
        StaticJwksSource(key.jwks()), issuer=ISSUER, audience=AUDIENCE, revocations=revocations
    )
    issued = int(time.time()) - 10
    await feed.publish(Revocation("subject", ALICE, issued))
    await revocations.refresh()
    feed.broken = True
    clock.now += 5
    with pytest.raises(Unauthenticated):  # the revocation read before the outage still holds
        await verifier.verify(key.token(iat=issued))
    assert (await verifier.verify(key.token(iat=issued + 1))).subject == ALICE
