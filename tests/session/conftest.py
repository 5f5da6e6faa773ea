"""A session service on a real gRPC server (port 0) over real SQLite/PostgreSQL and an
in-process/Redis hub, with the runtime, ledger, audit log and storage faked at their ports."""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from corral.libs import db
from corral.libs.auth import StaticJwksSource, TokenVerifier
from corral.libs.eventhub import EventHub, InMemoryHub, RedisStreamHub
from corral.libs.grpc.interceptors import AuthenticationHook
from corral.libs.grpc.server import CorralServer, ServerConfig
from corral.libs.redis import create_redis
from corral.services.session.domain import now
from corral.services.session.main import MIGRATIONS, Wiring, wire
from corral.services.session.service import SessionService
from corral.session.v1 import session_service_pb2_grpc as rpc
from tests.conftest import require_postgres, require_redis
from tests.session.fakes import FakeAudit, FakeLedger, FakeRuntime, FakeWorkspaces
from tests.support.keys import AUDIENCE, ISSUER, SigningKey

ACME = "organizations/acme"
GLOBEX = "organizations/globex"
LEASE_SECONDS = 30.0


@dataclass
class Stack:
    address: str
    service: SessionService
    runtime: FakeRuntime
    ledger: FakeLedger
    audit: FakeAudit
    key: SigningKey
    channel: grpc.aio.Channel
    make_service: Callable[..., SessionService]
    engine: AsyncEngine  # the service's database, for tests that read its raw rows
    make_wiring: Callable[..., Wiring]  # another replica, with its gRPC registration
    workspaces: FakeWorkspaces  # storage's

    @property
    def stub(self) -> rpc.SessionServiceStub:
        return rpc.SessionServiceStub(self.channel)

    def token(
        self, user: str = "alice", *, org: str = ACME, roles: tuple[str, ...] = ("user",)
    ) -> str:
        return self.key.token(sub=f"{org}/users/{user}", org=org, roles=list(roles))

    def auth(self, user: str = "alice", **kw: Any) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token(user, **kw)}"),)


TEST_KEYS = "test1:" + base64.b64encode(b"k" * 32).decode()


@pytest.fixture(autouse=True)
def encryption_keys(monkeypatch: pytest.MonkeyPatch) -> str:
    """The key ring the service builds from its settings (no key file under the data dir)."""
    monkeypatch.setenv("CORRAL_ENCRYPTION_KEYS", TEST_KEYS)
    return TEST_KEYS


@pytest.fixture(
    params=[
        "sqlite+memory",
        pytest.param("postgresql+redis", marks=[pytest.mark.postgres, pytest.mark.redis]),
    ]
)
async def stack(
    request: pytest.FixtureRequest, tmp_path: Path, signing_key: SigningKey
) -> AsyncIterator[Stack]:
    hub: EventHub
    redis_client = None
    schema = f"test_{uuid.uuid4().hex[:12]}"
    if request.param == "sqlite+memory":
        url = f"sqlite+aiosqlite:///{tmp_path}/session.db"
        hub = InMemoryHub()
    else:
        url = await require_postgres()
        redis_client = create_redis(await require_redis())
        hub = RedisStreamHub(redis_client, prefix=f"test:{schema}:")
    engine = db.create_engine(url, schema=schema)
    await db.migrate(engine, MIGRATIONS, schema=schema)
    runtime, ledger, audit, workspaces = FakeRuntime(), FakeLedger(), FakeAudit(), FakeWorkspaces()

    def make(
        clock: Callable[[], datetime] = now, instance: str = "", lease: float = LEASE_SECONDS
    ) -> Wiring:
        """Another replica of the service (``clock``: the time as it sees it; ``instance``:
        its name on its turns, as a restarted process keeps it; ``lease``: its turns')."""
        return wire(
            engine,
            hub,
            runtime,
            ledger,
            audit,
            workspaces=workspaces,
            heartbeat_seconds=0.3,
            lease_seconds=lease,
            clock=clock,
            instance=instance,
        )

    def make_service(
        clock: Callable[[], datetime] = now, instance: str = "", lease: float = LEASE_SECONDS
    ) -> SessionService:
        return make(clock, instance, lease).service

    wired = make()
    service = wired.service
    verifier = TokenVerifier(StaticJwksSource(signing_key.jwks()), issuer=ISSUER, audience=AUDIENCE)
    server = CorralServer(
        ServerConfig(name="session", hooks=[AuthenticationHook(verifier)], tracing=False),
        [wired.registration],
    )
    await server.start()
    channel = grpc.aio.insecure_channel(server.address)
    try:
        yield Stack(
            server.address,
            service,
            runtime,
            ledger,
            audit,
            signing_key,
            channel,
            make_service,
            engine,
            make,
            workspaces,
        )
    finally:
        await channel.close()
        await service.close()
        await server.stop(0)
        await hub.close()
        if redis_client is not None:
            await redis_client.aclose()
        if request.param != "sqlite+memory":
            from sqlalchemy import text

            async with engine.begin() as connection:
                await connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await engine.dispose()
