"""Fixtures of the runtime's security tests: the platform as `corral dev` runs it (identity,
runtime and session over gRPC, the real Claude Agent SDK and CLI against the offline model),
populated with two organizations and one principal of every kind, with their tokens."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from corral.identity.v1 import identity_service_pb2 as ipb
from corral.identity.v1 import organization_pb2, role_pb2, service_account_pb2, user_pb2
from corral.session.v1 import agent_options_pb2 as opts
from corral.session.v1 import event_pb2, session_pb2
from corral.session.v1 import session_service_pb2 as spb
from tests.runtime.conftest import make_runtime
from tests.support.platform import Platform, directive, running_platform

# make_runtime: the runtime alone, with the real SDK and CLI (tests/runtime/conftest.py).
__all__ = ["Platform", "World", "directive", "make_runtime"]

PASSWORD = "a perfectly fine password"
ORGS = ("acme", "globex")


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class World:
    platform: Platform
    tokens: dict[str, str] = field(default_factory=dict)  # principal -> access token
    names: dict[str, str] = field(default_factory=dict)  # principal -> resource name

    def auth(self, principal: str) -> tuple[tuple[str, str], ...]:
        return bearer(self.tokens[principal])

    async def service_token(self) -> str:
        """The platform's own internal service principal (what the session service uses)."""
        key = (self.platform.settings.data_dir / "service-api-key").read_text().strip()
        reply = await self.platform.identity.ExchangeApiKey(ipb.ExchangeApiKeyRequest(api_key=key))
        return str(reply.token.access_token)

    async def new_session(self, principal: str, **options: Any) -> str:
        reply = await self.platform.sessions.CreateSession(
            spb.CreateSessionRequest(
                session=session_pb2.Session(
                    display_name="security", agent_options=opts.AgentOptions(**options)
                )
            ),
            metadata=self.auth(principal),
        )
        return str(reply.session.name)

    async def say(self, principal: str, session: str, text: str) -> None:
        await self.platform.sessions.SendMessage(
            spb.SendMessageRequest(session=session, text=text, request_id=str(uuid.uuid4())),
            metadata=self.auth(principal),
        )

    async def turn_results(
        self, principal: str, session: str, *, count: int = 1, within: float = 90.0
    ) -> list[event_pb2.SessionEvent]:
        """The session's events until its ``count``-th turn_result."""
        seen: list[event_pb2.SessionEvent] = []
        call = self.platform.sessions.StreamSessionEvents(
            spb.StreamSessionEventsRequest(session=session), metadata=self.auth(principal)
        )
        async with asyncio.timeout(within):
            async for response in call:
                if response.event.HasField("heartbeat"):
                    continue
                seen.append(response.event)
                if sum(1 for e in seen if e.HasField("turn_result")) >= count:
                    call.cancel()
                    return seen
        raise AssertionError("the stream ended")

    def workspace(self, session: str) -> Path:
        return self.platform.workspace(session)


async def populate(platform: Platform) -> World:
    """acme (admin, user, viewer, a non-internal admin service account) and globex (admin)."""
    world = World(platform)
    identity = platform.identity
    root = platform.auth
    world.tokens["superuser"] = platform.token
    for org_id in ORGS:
        await identity.CreateOrganization(
            ipb.CreateOrganizationRequest(
                organization=organization_pb2.Organization(display_name=org_id.title()),
                organization_id=org_id,
            ),
            metadata=root,
        )
    people = [
        ("admin", "acme", role_pb2.ROLE_ADMIN),
        ("user", "acme", role_pb2.ROLE_USER),
        ("viewer", "acme", role_pb2.ROLE_VIEWER),
        ("other_admin", "globex", role_pb2.ROLE_ADMIN),
        ("other_user", "globex", role_pb2.ROLE_USER),
    ]
    for label, org_id, role in people:
        email = f"{label}-{uuid.uuid4().hex[:8]}@{org_id}.test"
        reply = await identity.CreateUser(
            ipb.CreateUserRequest(
                parent=f"organizations/{org_id}",
                user=user_pb2.User(email=email, display_name=label, role=role, password=PASSWORD),  # type: ignore[arg-type]
            ),
            metadata=root,
        )
        world.names[label] = reply.user.name
        login = await identity.Login(ipb.LoginRequest(email=email, password=PASSWORD))
        world.tokens[label] = login.token.access_token
    # An organisation's own (not internal) service account, with the admin role.
    account = await identity.CreateServiceAccount(
        ipb.CreateServiceAccountRequest(
            parent="organizations/acme",
            service_account=service_account_pb2.ServiceAccount(
                display_name="ci", role=role_pb2.ROLE_ADMIN
            ),
        ),
        metadata=root,
    )
    key = await identity.CreateApiKey(
        ipb.CreateApiKeyRequest(parent=account.service_account.name), metadata=root
    )
    exchanged = await identity.ExchangeApiKey(ipb.ExchangeApiKeyRequest(api_key=key.plaintext_key))
    world.tokens["org_service_account"] = exchanged.token.access_token
    return world


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with running_platform(tmp_path) as platform:
        yield await populate(platform)
