"""A real identity server (grpc.aio on port 0 + the HTTP JWKS endpoint) on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from corral.identity.v1 import identity_service_pb2 as pb
from corral.identity.v1 import identity_service_pb2_grpc
from corral.libs.auth.revocation import InMemoryRevocations, RevocationStore
from corral.services.identity.config import IdentitySettings
from corral.services.identity.main import Dependencies, IdentityApp, build_server

ADMIN_EMAIL = "root@corral.test"
ADMIN_PASSWORD = "correct horse battery staple"
PASSWORD = "a perfectly fine password"


class Clock:
    """The clock the server reads: real time plus however far a test has moved it on."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@dataclass
class Identity:
    app: IdentityApp
    stub: identity_service_pb2_grpc.IdentityServiceAsyncStub
    settings: IdentitySettings
    clock: Clock
    revocations: RevocationStore

    @property
    def jwks_url(self) -> str:
        assert self.app.jwks_http is not None
        return f"http://127.0.0.1:{self.app.jwks_http.port}/.well-known/jwks.json"

    async def login(self, email: str, password: str = PASSWORD) -> pb.LoginResponse:
        return await self.stub.Login(pb.LoginRequest(email=email, password=password))

    async def token(self, email: str, password: str = PASSWORD) -> str:
        return (await self.login(email, password)).token.access_token

    async def root(self) -> str:
        return await self.token(ADMIN_EMAIL, ADMIN_PASSWORD)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)
    assert status is not None, "the error carries no google.rpc.Status"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo detail")


def detail_of(error: grpc.aio.AioRpcError, kind: Any) -> Any:
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            message = kind()
            detail.Unpack(message)
            return message
    return None


async def fails(
    call: Awaitable[Any], code: grpc.StatusCode, reason: str | None = None
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    if reason is not None:
        assert error_info(caught.value).reason == reason
    return caught.value


IdentityFactory = Callable[..., Awaitable[Identity]]


@pytest.fixture
async def make_identity(
    database_url: tuple[str, str], tmp_path: Path
) -> AsyncIterator[IdentityFactory]:
    url, schema = database_url
    started: list[tuple[IdentityApp, grpc.aio.Channel]] = []
    # The test's own revocation feed, shared by its replicas (the process-wide one would carry
    # one test's revocations, at its moved clock, into the next).
    revocations = InMemoryRevocations()

    async def make(revocations: RevocationStore = revocations, **overrides: Any) -> Identity:
        values: dict[str, Any] = {
            "env": "development",
            "identity_database_url": url,
            "identity_database_schema": schema,
            "data_dir": tmp_path,
            "identity_port": 0,
            "identity_http_port": 0,
            "bootstrap_admin_email": ADMIN_EMAIL,
            "bootstrap_admin_password": ADMIN_PASSWORD,
            "identity_argon2_time_cost": 1,
            "identity_argon2_memory_kib": 256,
            "identity_argon2_parallelism": 1,
            "identity_key_encryption_key": "",
            "health_check_interval_seconds": 30.0,
        }
        values.update(overrides)
        settings = IdentitySettings(**values)
        clock = Clock()
        app = await build_server(Dependencies(settings, clock, revocations), port=0)
        await app.start()
        channel = grpc.aio.insecure_channel(app.server.address)
        started.append((app, channel))
        stub = identity_service_pb2_grpc.IdentityServiceStub(channel)
        return Identity(app, stub, settings, clock, revocations)  # type: ignore[arg-type]

    yield make
    for app, channel in reversed(started):
        await channel.close()
        await app.stop(0)


@pytest.fixture
async def identity(make_identity: IdentityFactory) -> Identity:
    return await make_identity()
