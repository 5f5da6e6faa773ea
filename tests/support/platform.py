"""The platform as `corral dev` runs it, minus Envoy and task: identity, storage, runtime and
session on free ports, SQLite under a temporary data folder, the real Claude Agent SDK and CLI
against the offline model server, signed in as the bootstrap admin. Used by tests/e2e and the
benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import field_mask_pb2

from corral.identity.v1 import identity_service_pb2 as ipb
from corral.identity.v1 import identity_service_pb2_grpc as irpc
from corral.libs.app import ServiceApp
from corral.services import registry
from corral.services.identity.config import IdentitySettings
from corral.services.identity.main import IdentityApp
from corral.session.v1 import agent_policy_pb2, session_pb2
from corral.session.v1 import session_service_pb2 as spb
from corral.session.v1 import session_service_pb2_grpc as srpc

ADMIN = ("admin@corral.local", "e2e-admin-password")
E2E_SERVICES = ("identity", "storage", "runtime", "session")
# What the tests' MCP server needs inside an agent's sandbox: this Python and its packages, and
# the test folder the server's script is in.
MCP_SERVER = Path(__file__).resolve().parent.parent / "runtime" / "mcp_calc_server.py"
SANDBOX_READ_ONLY = [Path(sys.prefix), Path(sys.base_prefix), MCP_SERVER.parent]


def directive(*steps: dict[str, Any]) -> str:
    """A prompt that scripts the offline model (services/runtime/offline_model/script.py)."""
    return f"<<corral-model {json.dumps(list(steps))}>>"


@dataclass
class Platform:
    settings: IdentitySettings
    apps: dict[str, ServiceApp]
    token: str
    channels: list[grpc.aio.Channel]

    @property
    def auth(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)

    def channel(self, service: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(self.settings.target_for(service))
        self.channels.append(channel)
        return channel

    @property
    def sessions(self) -> srpc.SessionServiceStub:
        return srpc.SessionServiceStub(self.channel("session"))

    @property
    def identity(self) -> irpc.IdentityServiceStub:
        return irpc.IdentityServiceStub(self.channel("identity"))

    def workspace(self, session_name: str) -> Path:
        """The session's working directory: its workspace in storage's folder."""
        return self.settings.workspaces_dir() / session_name.removeprefix("sessions/")

    async def restart(self, name: str) -> None:
        """Stop a service abruptly (its processes die with it) and start a new one in its place."""
        await self.apps[name].stop(0)
        self.apps[name] = await registry.build(name, self.settings)
        await self.apps[name].start()


TURN_OVER = (session_pb2.Session.STATE_IDLE, session_pb2.Session.STATE_FAILED)


async def until_turn_over(platform: Platform, session: str) -> None:
    """Until the session has no turn running (IDLE, or FAILED after a failed turn), within
    30 s: bounded polling of the session's state."""
    async with asyncio.timeout(30):
        while True:
            got = await platform.sessions.GetSession(
                spb.GetSessionRequest(name=session), metadata=platform.auth
            )
            if got.session.state in (
                session_pb2.Session.STATE_IDLE,
                session_pb2.Session.STATE_FAILED,
            ):
                return
            await asyncio.sleep(0.05)


async def allow_mcp_commands(platform: Platform, *commands: str) -> None:
    """The organisation's agent policy lets sessions start these stdio MCP servers (none are
    allowed by default)."""
    await platform.sessions.UpdateAgentPolicy(
        spb.UpdateAgentPolicyRequest(
            agent_policy=agent_policy_pb2.AgentPolicy(
                name="organizations/default/agentPolicy", allowed_mcp_commands=list(commands)
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["allowed_mcp_commands"]),
        ),
        metadata=platform.auth,
    )


@contextlib.asynccontextmanager
async def running_platform(data_dir: Path, **overrides: Any) -> AsyncIterator[Platform]:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "identity_http_port": 0,
        "bootstrap_admin_email": ADMIN[0],
        "bootstrap_admin_password": ADMIN[1],
        "anthropic_api_key": "",
        "anthropic_base_url": "",
        "runtime_pool_size": 2,
        "session_heartbeat_seconds": 1.0,
        "runtime_sandbox_read_only": SANDBOX_READ_ONLY,
        **{f"{name}_port": 0 for name in E2E_SERVICES},
    }
    settings = IdentitySettings(**{**values, **overrides})
    apps: dict[str, ServiceApp] = {}
    channels: list[grpc.aio.Channel] = []
    try:
        # Each binds port 0 (no guessed port another process can take first) and the next is
        # built with the addresses the earlier ones got: identity first (its JWKS and service
        # key), then storage and the runtime, then the session service that calls them.
        for name in E2E_SERVICES:
            app = apps[name] = await registry.build(name, settings)
            bound: dict[str, int] = {f"{name}_port": await app.start()}
            if isinstance(app, IdentityApp) and app.jwks_http is not None:
                bound["identity_http_port"] = app.jwks_http.port
            settings = settings.model_copy(update=bound)
        async with grpc.aio.insecure_channel(settings.target_for("identity")) as channel:
            login = await irpc.IdentityServiceStub(channel).Login(
                ipb.LoginRequest(email=ADMIN[0], password=ADMIN[1])
            )
        yield Platform(settings, apps, login.token.access_token, channels)
    finally:
        for channel in channels:
            await channel.close()
        for app in reversed(list(apps.values())):
            await app.stop(0)
