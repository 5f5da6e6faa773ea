"""Revocation everywhere in seconds, as a user of another service sees it.

Identity and the session service run as separate servers that share the revocation feed: one
Redis (as replicas in production do) or the process-local feed (as `corral dev` runs them). An
attacker holds a token that is still cryptographically valid for 15 minutes; after the change
on identity (a user disabled, signed out everywhere, an API key revoked, an organization
disabled), the session service must refuse it with UNAUTHENTICATED / TOKEN_REVOKED within a
few seconds. The latency (from the change's RPC returning to the first refused call, polling
every 50 ms) is measured and printed; a fresh sign-in afterwards works.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from corral.identity.v1 import identity_service_pb2 as ipb
from corral.identity.v1 import identity_service_pb2_grpc as irpc
from corral.identity.v1 import organization_pb2, role_pb2, service_account_pb2, user_pb2
from corral.libs.app import ServiceApp
from corral.services import registry
from corral.services.identity.config import IdentitySettings
from corral.services.identity.main import Dependencies, build_server
from corral.session.v1 import session_service_pb2 as spb
from corral.session.v1 import session_service_pb2_grpc as srpc
from tests.conftest import require_redis
from tests.support.grpc_tools import error_reason as _reason

LATENCY_BOUND_SECONDS = 5.0
POLL_SECONDS = 0.05
PASSWORD = "a perfectly fine password"
ROOT = ("root@corral.test", "correct horse battery staple")


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class Stack:
    identity: irpc.IdentityServiceStub
    sessions: srpc.SessionServiceStub
    root: tuple[tuple[str, str], ...]
    org: str  # a fresh organization of this test's own (the feed may be shared)

    async def login(self, email: str) -> ipb.LoginResponse:
        return await self.identity.Login(ipb.LoginRequest(email=email, password=PASSWORD))

    async def new_user(self, role: int = role_pb2.ROLE_USER) -> str:
        email = f"u-{uuid.uuid4().hex[:8]}@{self.org.split('/')[1]}.test"
        await self.identity.CreateUser(
            ipb.CreateUserRequest(
                parent=self.org,
                user=user_pb2.User(email=email, display_name="u", role=role, password=PASSWORD),  # type: ignore[arg-type]
            ),
            metadata=self.root,
        )
        return email

    async def session_call(self, token: str) -> None:
        """A call on the session service with ``token`` (listing the caller's sessions)."""
        await self.sessions.ListSessions(spb.ListSessionsRequest(), metadata=_bearer(token))

    async def refused_within(self, token: str, what: str) -> float:
        """Seconds from now to the session service's first TOKEN_REVOKED for ``token``."""
        start = time.monotonic()
        while True:
            refusal = await self._refusal(token)
            latency = time.monotonic() - start
            if refusal is not None:
                assert refusal.code() == grpc.StatusCode.UNAUTHENTICATED, refusal.details()
                assert _reason(refusal) == "TOKEN_REVOKED"
                print(f"\nrevocation latency ({what}): {latency * 1000:.0f} ms")
                return latency
            if latency > LATENCY_BOUND_SECONDS:
                raise AssertionError(f"{what}: still accepted after {LATENCY_BOUND_SECONDS} s")
            await asyncio.sleep(POLL_SECONDS)

    async def _refusal(self, token: str) -> grpc.aio.AioRpcError | None:
        try:
            await self.session_call(token)
        except grpc.aio.AioRpcError as error:
            return error
        return None


@pytest.fixture(params=["redis", "local"])
async def stack(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stack]:
    """Identity, then the session service (its JWKS from identity's HTTP endpoint), each its
    own server on port 0, sharing the feed of ``request.param``."""
    redis_url = await require_redis() if request.param == "redis" else ""
    settings = IdentitySettings(
        env="development",
        data_dir=tmp_path,
        redis_url=redis_url,
        identity_port=0,
        identity_http_port=0,
        session_port=0,
        runtime_port=0,
        bootstrap_admin_email=ROOT[0],
        bootstrap_admin_password=ROOT[1],
        identity_argon2_time_cost=1,
        identity_argon2_memory_kib=256,
        identity_argon2_parallelism=1,
        health_check_interval_seconds=30.0,
    )
    apps: list[ServiceApp] = []
    channels: list[grpc.aio.Channel] = []
    try:
        identity_app = await build_server(Dependencies(settings), port=0)
        apps.append(identity_app)
        identity_port = await identity_app.start()
        assert identity_app.jwks_http is not None
        settings = settings.model_copy(
            update={
                "identity_port": identity_port,
                "identity_http_port": identity_app.jwks_http.port,
            }
        )
        session_app = await registry.build("session", settings, port=0)
        apps.append(session_app)
        session_port = await session_app.start()
        channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{identity_port}"),
            grpc.aio.insecure_channel(f"127.0.0.1:{session_port}"),
        ]
        identity = irpc.IdentityServiceStub(channels[0])
        login = await identity.Login(ipb.LoginRequest(email=ROOT[0], password=ROOT[1]))
        root = _bearer(login.token.access_token)
        org_id = f"rev-{uuid.uuid4().hex[:10]}"
        await identity.CreateOrganization(
            ipb.CreateOrganizationRequest(
                organization=organization_pb2.Organization(display_name="Revocation"),
                organization_id=org_id,
            ),
            metadata=root,
        )
        yield Stack(identity, srpc.SessionServiceStub(channels[1]), root, f"organizations/{org_id}")
    finally:
        for channel in channels:
            await channel.close()
        for app in reversed(apps):
            await app.stop(0)


async def _measured(
    stack: Stack, token: str, what: str, change: Callable[[], Awaitable[Any]]
) -> float:
    await stack.session_call(token)  # accepted before the change
    await change()
    latency = await stack.refused_within(token, what)
    assert latency < LATENCY_BOUND_SECONDS
    return latency


async def test_disabling_a_user(stack: Stack) -> None:
    email = await stack.new_user()
    login = await stack.login(email)
    await _measured(
        stack,
        login.token.access_token,
        "user disabled",
        lambda: stack.identity.DisableUser(
            ipb.DisableUserRequest(name=login.user.name), metadata=stack.root
        ),
    )
    await stack.identity.EnableUser(
        ipb.EnableUserRequest(name=login.user.name), metadata=stack.root
    )
    fresh = await stack.login(email)
    await stack.session_call(fresh.token.access_token)


async def test_logging_out_everywhere(stack: Stack) -> None:
    email = await stack.new_user()
    laptop, phone = await stack.login(email), await stack.login(email)
    fresh: list[ipb.LoginResponse] = []

    async def sign_out_and_in_again() -> None:
        await stack.identity.LogoutEverywhere(
            ipb.LogoutEverywhereRequest(), metadata=_bearer(phone.token.access_token)
        )
        fresh.append(await stack.login(email))  # at once: most likely within the same second

    await _measured(
        stack, laptop.token.access_token, "signed out everywhere", sign_out_and_in_again
    )
    await stack.refused_within(phone.token.access_token, "the other sign-in")
    await stack.session_call(fresh[0].token.access_token)  # issued after: accepted


async def test_revoking_an_api_key(stack: Stack) -> None:
    account = (
        await stack.identity.CreateServiceAccount(
            ipb.CreateServiceAccountRequest(
                parent=stack.org,
                service_account=service_account_pb2.ServiceAccount(
                    display_name="ci", role=role_pb2.ROLE_USER
                ),
            ),
            metadata=stack.root,
        )
    ).service_account
    revoked, kept = [
        await stack.identity.CreateApiKey(
            ipb.CreateApiKeyRequest(parent=account.name), metadata=stack.root
        )
        for _ in range(2)
    ]

    async def exchange(key: ipb.CreateApiKeyResponse) -> str:
        reply = await stack.identity.ExchangeApiKey(
            ipb.ExchangeApiKeyRequest(api_key=key.plaintext_key)
        )
        return str(reply.token.access_token)

    token, other = await exchange(revoked), await exchange(kept)
    await _measured(
        stack,
        token,
        "API key revoked",
        lambda: stack.identity.RevokeApiKey(
            ipb.RevokeApiKeyRequest(name=revoked.api_key.name), metadata=stack.root
        ),
    )
    await stack.session_call(other)  # the account's other key is untouched
    await stack.session_call(await exchange(kept))


async def test_disabling_an_organization(stack: Stack) -> None:
    email = await stack.new_user(role_pb2.ROLE_ADMIN)
    login = await stack.login(email)
    bystander = await stack.login(await _outside_user(stack))
    await _measured(
        stack,
        login.token.access_token,
        "organization disabled",
        lambda: stack.identity.DisableOrganization(
            ipb.DisableOrganizationRequest(name=stack.org), metadata=stack.root
        ),
    )
    await stack.session_call(bystander.token.access_token)  # another organization: untouched
    await stack.identity.EnableOrganization(
        ipb.EnableOrganizationRequest(name=stack.org), metadata=stack.root
    )
    fresh = await stack.login(email)
    await stack.session_call(fresh.token.access_token)


async def _outside_user(stack: Stack) -> str:
    email = f"o-{uuid.uuid4().hex[:8]}@default.test"
    await stack.identity.CreateUser(
        ipb.CreateUserRequest(
            parent="organizations/default",
            user=user_pb2.User(
                email=email, display_name="o", role=role_pb2.ROLE_USER, password=PASSWORD
            ),  # type: ignore[arg-type]
        ),
        metadata=stack.root,
    )
    return email
