"""Rate limiting: the GCRA contract on memory and on Redis, then the hook on real servers.

The gRPC tests reuse the probe service of ``test_grpc_kit`` on real ``grpc.aio`` servers on
port 0 with the real interceptor, and assert what a client sees: the status code and the
decoded ``google.rpc.Status`` details.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from corral.libs.auth import StaticJwksSource, TokenVerifier
from corral.libs.auth.caller import Caller
from corral.libs.grpc.interceptors import AuthenticationHook, CallHook
from corral.libs.grpc.server import CorralServer, ServerConfig
from corral.libs.ratelimit import (
    InMemoryRateLimiter,
    RateLimiter,
    RateLimitHook,
    RedisRateLimiter,
    StaticLimits,
    client_address,
    trusted_networks,
)
from corral.libs.redis import create_redis
from tests.conftest import require_redis
from tests.libs.test_grpc_kit import SERVICE, Probe, _bearer, _call, _health, _registration, _struct
from tests.support.keys import AUDIENCE, ISSUER, SigningKey

ALICE = "organizations/acme/users/alice"


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[RateLimiter]:
    """The same contract suite for both implementations."""
    if request.param == "memory":
        yield InMemoryRateLimiter()
        return
    client = create_redis(await require_redis())
    yield RedisRateLimiter(client, prefix=f"test:{uuid.uuid4().hex}:")
    await client.aclose()


async def test_burst_is_allowed_then_refused_until_the_retry_delay_passes(
    limiter: RateLimiter,
) -> None:
    interval = 0.2  # 300 per minute
    decisions = [await limiter.acquire("alice", 300, 3) for _ in range(3)]
    assert [(d.allowed, d.remaining) for d in decisions] == [(True, 2), (True, 1), (True, 0)]

    refused = await limiter.acquire("alice", 300, 3)
    assert not refused.allowed
    assert 0 < refused.retry_after_seconds <= interval
    again = await limiter.acquire("alice", 300, 3)  # refusals do not push recovery out
    assert not again.allowed
    assert again.retry_after_seconds <= refused.retry_after_seconds

    await asyncio.sleep(again.retry_after_seconds + 0.01)
    assert (await limiter.acquire("alice", 300, 3)).allowed
    assert not (await limiter.acquire("alice", 300, 3)).allowed


async def test_keys_are_independent(limiter: RateLimiter) -> None:
    assert [(await limiter.acquire("alice", 6, 2)).allowed for _ in range(3)] == [
        True,
        True,
        False,
    ]
    refused = await limiter.acquire("alice", 6, 2)
    assert 9.0 < refused.retry_after_seconds <= 10.0  # one emission interval at 6 per minute
    assert (await limiter.acquire("bob", 6, 2)).allowed


async def test_memory_limiter_forgets_idle_keys_and_stays_bounded() -> None:
    now = [0.0]
    limiter = InMemoryRateLimiter(max_keys=3, sweep_seconds=60.0, clock=lambda: now[0])
    for caller in ("a", "b", "c", "d", "e"):
        await limiter.acquire(caller, 60, 5)
    assert len(limiter) == 3  # least recently used dropped beyond max_keys

    now[0] = 61.0  # every TAT (1 s after its request) has passed: all idle
    await limiter.acquire("f", 60, 5)
    assert len(limiter) == 1


def _bare_server(hooks: Sequence[CallHook]) -> CorralServer:
    return CorralServer(
        ServerConfig(name="probe", hooks=hooks, shutdown_grace=1.0, tracing=False),
        [_registration(Probe())],
    )


@asynccontextmanager
async def _servers(
    signing_key: SigningKey, *rate_limits: RateLimitHook
) -> AsyncIterator[list[CorralServer]]:
    """One server per hook, each authenticating then rate limiting, like a service's replicas."""
    verifier = TokenVerifier(StaticJwksSource(signing_key.jwks()), issuer=ISSUER, audience=AUDIENCE)
    authenticate = AuthenticationHook(verifier, public_methods=[f"/{SERVICE}/Public"])
    servers = [_bare_server([authenticate, hook]) for hook in rate_limits]
    async with AsyncExitStack() as stack:
        for server in servers:
            await server.start()
            stack.push_async_callback(server.stop, 0)
        yield servers


async def _attempt(address: str, method: str, token: str | None) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            await _call(channel, method)(_struct(), metadata=_bearer(token) if token else ())
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def _detail(error: grpc.aio.AioRpcError, kind: type[Message]) -> Any:
    status = rpc_status.from_call(error)
    assert status is not None, "the error carries no google.rpc.Status"
    [found] = [d for d in status.details if d.Is(kind.DESCRIPTOR)]
    message = kind()
    found.Unpack(message)
    return message


async def test_refused_call_is_resource_exhausted_with_retry_info_and_quota_failure(
    signing_key: SigningKey,
) -> None:
    hook = RateLimitHook(InMemoryRateLimiter(), StaticLimits(6, 6), burst=2)
    token = signing_key.token()
    async with _servers(signing_key, hook) as [server]:
        assert [await _attempt(server.address, "Whoami", token) for _ in range(2)] == [
            grpc.StatusCode.OK
        ] * 2
        async with grpc.aio.insecure_channel(server.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _call(channel, "Whoami")(_struct(), metadata=_bearer(token))
        # Another caller has an allowance of its own.
        other = signing_key.token(sub="organizations/acme/users/bob")
        assert await _attempt(server.address, "Whoami", other) == grpc.StatusCode.OK

    error = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = _detail(error, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("RATE_LIMITED", "corral.dev")
    assert dict(info.metadata) == {"requests_per_minute": "6", "burst": "2"}
    retry = _detail(error, error_details_pb2.RetryInfo)
    assert 9.0 < retry.retry_delay.ToTimedelta().total_seconds() <= 10.0
    [violation] = _detail(error, error_details_pb2.QuotaFailure).violations
    assert violation.subject == ALICE
    assert violation.description.startswith("requests_per_minute: 6 requests per minute")


async def test_anonymous_calls_are_limited_by_client_address(signing_key: SigningKey) -> None:
    hook = RateLimitHook(InMemoryRateLimiter(), StaticLimits(600, 2), burst=50)
    async with _servers(signing_key, hook) as [server]:
        codes = [await _attempt(server.address, "Public", None) for _ in range(3)]
        assert codes == [grpc.StatusCode.OK, grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED]
        async with grpc.aio.insecure_channel(server.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _call(channel, "Public")(_struct())
        [violation] = _detail(caught.value, error_details_pb2.QuotaFailure).violations
        assert violation.subject == "anon:127.0.0.1"
        # The same client with a token is limited as its subject, not as its address.
        token = signing_key.token()
        assert await _attempt(server.address, "Public", token) == grpc.StatusCode.OK


async def _anonymous(address: str, forwarded: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            await _call(channel, "Public")(_struct(), metadata=(("x-forwarded-for", forwarded),))
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


async def test_a_forwarded_address_from_an_untrusted_peer_is_ignored(
    signing_key: SigningKey,
) -> None:
    """A client that reaches the service directly cannot dodge its anonymous limit (or spend
    someone else's) by sending x-forwarded-for: only the edge is believed."""
    hook = RateLimitHook(InMemoryRateLimiter(), StaticLimits(600, 2), burst=50)
    async with _servers(signing_key, hook) as [server]:
        codes = [await _anonymous(server.address, f"203.0.113.{n}") for n in range(3)]
    assert codes == [grpc.StatusCode.OK, grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED]


async def test_behind_a_trusted_edge_each_client_has_its_own_anonymous_allowance(
    signing_key: SigningKey,
) -> None:
    """Through the edge (here: loopback is trusted), the address Envoy appended last counts:
    one client using up its allowance does not block another, and what a client itself puts
    first in x-forwarded-for changes nothing."""
    hook = RateLimitHook(
        InMemoryRateLimiter(),
        StaticLimits(600, 2),
        burst=50,
        trusted_proxies=trusted_networks(["127.0.0.1/32"]),
    )
    async with _servers(signing_key, hook) as [server]:
        noisy = [await _anonymous(server.address, f"10.9.9.{n}, 198.51.100.7") for n in range(3)]
        other = await _anonymous(server.address, "198.51.100.8")
    assert noisy == [grpc.StatusCode.OK, grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert other == grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("ipv4:127.0.0.1:5000", "198.51.100.7", "198.51.100.7"),
        ("ipv4:127.0.0.1:5000", "1.2.3.4, 198.51.100.7", "198.51.100.7"),
        ("ipv4:127.0.0.1:5000", "not-an-address", "127.0.0.1"),
        ("ipv4:10.0.0.5:5000", "198.51.100.7", "10.0.0.5"),
        ("ipv6:%5B::1%5D:5000", "2001:db8::1", "2001:db8::1"),
        ("unix:/tmp/s", "198.51.100.7", "unix:/tmp/s"),
    ],
)
def test_client_address(peer: str, forwarded: str, expected: str) -> None:
    trusted = trusted_networks(["127.0.0.1/32", "::1/128"])
    assert client_address(peer, {"x-forwarded-for": forwarded}, trusted) == expected


@pytest.mark.redis
async def test_limit_holds_across_two_replicas_sharing_redis(
    redis_url: str, signing_key: SigningKey
) -> None:
    """20 concurrent calls alternating between two replicas: 5 pass in total, not 5 on each."""
    prefix = f"test:{uuid.uuid4().hex}:"
    clients = [create_redis(redis_url), create_redis(redis_url)]  # one connection pool each
    hooks = [
        RateLimitHook(
            RedisRateLimiter(client, prefix=prefix), StaticLimits(6, 6), burst=5, scope="probe"
        )
        for client in clients
    ]
    token = signing_key.token()
    try:
        async with _servers(signing_key, *hooks) as servers:
            started = time.monotonic()
            codes = await asyncio.gather(
                *(_attempt(servers[i % 2].address, "Whoami", token) for i in range(20))
            )
            elapsed = time.monotonic() - started
    finally:
        for client in clients:
            await client.aclose()
    # The burst of 5, plus one more for every 10 s the calls took (6 a minute) on a slow machine.
    allowed = codes.count(grpc.StatusCode.OK)
    assert 5 <= allowed <= 5 + int(elapsed // 10)
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 20 - allowed


async def test_health_checks_are_never_rate_limited(signing_key: SigningKey) -> None:
    hook = RateLimitHook(InMemoryRateLimiter(), StaticLimits(1, 1), burst=1)
    async with _servers(signing_key, hook) as [server]:
        assert [await _health(server.address) for _ in range(10)] == ["SERVING"] * 10
        assert [await _health(server.address, SERVICE) for _ in range(10)] == ["SERVING"] * 10
        # The limit is in force for everything else.
        codes = [await _attempt(server.address, "Public", None) for _ in range(2)]
        assert codes == [grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_redis_outage_lets_calls_through_and_warns(
    signing_key: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="corral.ratelimit")
    client = create_redis(f"redis://127.0.0.1:{_closed_port()}/0")
    hook = RateLimitHook(RedisRateLimiter(client), StaticLimits(1, 1), burst=1)
    token = signing_key.token()
    try:
        async with _servers(signing_key, hook) as [server]:
            codes = [await _attempt(server.address, "Whoami", token) for _ in range(3)]
    finally:
        await client.aclose()
    assert codes == [grpc.StatusCode.OK] * 3
    [warning] = [r for r in caplog.records if r.name == "corral.ratelimit"]  # one, not one a call
    assert warning.levelno == logging.WARNING
    assert "unavailable" in warning.getMessage()


async def test_quotas_carried_by_the_token_set_the_limits(signing_key: SigningKey) -> None:
    """Identity puts the caller's requests_per_minute quota (rpm) and the organisation's
    (org_rpm, one allowance for all of its callers) in the token; the default (600) is then
    not what applies."""
    hook = RateLimitHook(InMemoryRateLimiter(), StaticLimits(600, 60), burst=50)
    own = signing_key.token(sub="organizations/acme/users/carol", rpm=3)
    alice = signing_key.token(sub="organizations/acme/users/alice", org_rpm=4)
    bob = signing_key.token(sub="organizations/acme/users/bob", org_rpm=4)
    async with _servers(signing_key, hook) as [server]:
        assert [await _attempt(server.address, "Whoami", own) for _ in range(4)] == [
            *[grpc.StatusCode.OK] * 3,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ]
        shared = [
            await _attempt(server.address, "Whoami", t) for t in (alice, bob, alice, bob, alice)
        ]
        assert shared.count(grpc.StatusCode.OK) == 4
        assert shared[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_corral_services_have_their_own_generous_allowance(signing_key: SigningKey) -> None:
    """A service account calling as a Corral service (`service` role) is held to the service
    allowance, not a user's, and does not spend its organisation's shared allowance; a user
    token claiming no such role gets nothing of it."""
    limits = StaticLimits(2, 2, 600)
    hook = RateLimitHook(InMemoryRateLimiter(), limits, burst=2)
    service = signing_key.token(
        sub="organizations/system/serviceAccounts/session", roles=["user", "service"], org_rpm=2
    )
    user = signing_key.token(sub="organizations/system/users/alice", org_rpm=2)
    async with _servers(signing_key, hook) as [server]:
        # A second's worth at once (600 a minute: 10), far beyond a user's burst of 2.
        served = await asyncio.gather(
            *(_attempt(server.address, "Whoami", service) for _ in range(10))
        )
        assert served == [grpc.StatusCode.OK] * 10
        # The organisation's allowance (2) is still whole for its members.
        assert [await _attempt(server.address, "Whoami", user) for _ in range(3)] == [
            grpc.StatusCode.OK,
            grpc.StatusCode.OK,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ]
    # The service allowance is a limit too (the setting), not unlimited.
    caller = Caller(
        "organizations/system/serviceAccounts/session",
        "organizations/system",
        frozenset({"service"}),
    )
    assert await limits.requests_per_minute(caller) == 600
