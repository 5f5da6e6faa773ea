"""A storage service on a real gRPC server (port 0) over real SQLite/PostgreSQL, a real
filesystem root and a real blob store, with identity's ledger and audit log faked at their
ports; callers are tokens signed by a test key."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from corral.libs import db
from corral.libs.auth import StaticJwksSource, TokenVerifier
from corral.libs.grpc.interceptors import AuthenticationHook
from corral.libs.grpc.server import CorralServer, ServerConfig
from corral.services.storage.base import Limits
from corral.services.storage.blob_local import LocalBlobStore
from corral.services.storage.blobs import BlobStore
from corral.services.storage.main import MIGRATIONS, Wiring, compose
from corral.services.storage.ports import ArchivePacker
from corral.services.storage.service import StorageService
from corral.services.storage.workspace_fs import WorkspaceFiles
from corral.storage.v1 import storage_service_pb2 as pb
from corral.storage.v1 import storage_service_pb2_grpc as rpc
from corral.storage.v1 import workspace_pb2
from tests.conftest import require_postgres
from tests.storage.fakes import FakeAudit, FakeLedger
from tests.support.keys import AUDIENCE, ISSUER, SigningKey

ACME = "organizations/acme"
GLOBEX = "organizations/globex"
PLATFORM = "organizations/platform"
ALICE = f"{ACME}/users/alice"
BOB = f"{ACME}/users/bob"
SMALL_PART = 64 * 1024  # the local store's minimum part size in most tests (S3's is 5 MiB)
# Outside what a Timestamp may hold: 0001-01-01..9999-12-31, nanos 0..999,999,999.
BAD_TIMESTAMPS = [
    timestamp_pb2.Timestamp(seconds=2**62),
    timestamp_pb2.Timestamp(seconds=-(2**62)),
    timestamp_pb2.Timestamp(seconds=253_402_300_800),  # 10000-01-01
    timestamp_pb2.Timestamp(seconds=4_000_000_000, nanos=-1),
    timestamp_pb2.Timestamp(seconds=4_000_000_000, nanos=1_000_000_000),
]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def violated_fields(error: grpc.aio.AioRpcError) -> list[str]:
    """The fields an INVALID_ARGUMENT's BadRequest names; fails the test when it has none."""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"the error carries no google.rpc.Status: {error.details()}"
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return [v.field for v in bad.field_violations]
    raise AssertionError("the error carries no BadRequest")


@dataclass
class Stack:
    address: str
    service: StorageService
    ledger: FakeLedger
    audit: FakeAudit
    key: SigningKey
    channel: grpc.aio.Channel
    root: Path
    blobs: BlobStore
    engine: AsyncEngine
    make_replica: Callable[[], Wiring]
    replicas: list[Wiring] = field(default_factory=list)

    @property
    def stub(self) -> rpc.StorageServiceStub:
        return rpc.StorageServiceStub(self.channel)

    def token(
        self, user: str = "alice", *, org: str = ACME, roles: Iterable[str] = ("user",)
    ) -> str:
        return self.key.token(sub=f"{org}/users/{user}", org=org, roles=list(roles))

    def auth(self, user: str = "alice", **kw: Any) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token(user, **kw)}"),)

    def as_service(self) -> tuple[tuple[str, str], ...]:
        token = self.key.token(
            sub=f"{PLATFORM}/serviceAccounts/session", org=PLATFORM, roles=["service"]
        )
        return (("authorization", f"Bearer {token}"),)

    def workspace_dir(self, workspace: str) -> Path:
        return self.root / "workspaces" / workspace.removeprefix("workspaces/")

    async def workspace(
        self, session: str | None = None, *, owner: str = ALICE, org: str = ACME, **labels: str
    ) -> workspace_pb2.Workspace:
        """A new workspace, made as the session service makes it."""
        reply = await self.stub.CreateWorkspace(
            pb.CreateWorkspaceRequest(
                workspace=workspace_pb2.Workspace(
                    organization=org,
                    session=f"sessions/{session or uuid.uuid4().hex}",
                    owner=owner,
                    labels=labels,
                ),
                request_id=str(uuid.uuid4()),
            ),
            metadata=self.as_service(),
        )
        return reply.workspace

    async def settle(self) -> None:
        for wiring in [*self.replicas]:
            await wiring.service.settle()
        await self.service.settle()


@asynccontextmanager
async def running_stack(
    backend: str,
    tmp_path: Path,
    key: SigningKey,
    *,
    blobs: BlobStore | None = None,
    limits: Limits | None = None,
    packer: ArchivePacker | None = None,
) -> AsyncIterator[Stack]:
    schema = f"test_{uuid.uuid4().hex[:12]}"
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path}/storage.db"
    else:
        url = await require_postgres()
    engine = db.create_engine(url, schema=schema)
    await db.migrate(engine, MIGRATIONS, schema=schema)
    root = tmp_path / "storage"
    store = blobs or LocalBlobStore(root / "blobs", min_part_size=SMALL_PART)
    ledger, audit = FakeLedger(), FakeAudit()
    files = WorkspaceFiles(root)
    chosen = limits or Limits()

    def replica() -> Wiring:
        return compose(engine, files, store, ledger, audit, limits=chosen, packer=packer)

    wired = replica()
    verifier = TokenVerifier(StaticJwksSource(key.jwks()), issuer=ISSUER, audience=AUDIENCE)
    server = CorralServer(
        ServerConfig(name="storage", hooks=[AuthenticationHook(verifier)], tracing=False),
        [wired.registration],
    )
    await server.start()
    channel = grpc.aio.insecure_channel(server.address)
    stack = Stack(
        server.address, wired.service, ledger, audit, key, channel, root, store, engine, replica
    )
    stack.replicas.append(wired)
    try:
        yield stack
    finally:
        await channel.close()
        await server.stop(0)
        for wiring in stack.replicas:
            await wiring.service.close()
        if backend != "sqlite":
            async with engine.begin() as connection:
                await connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await engine.dispose()


BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
async def stack(
    request: pytest.FixtureRequest, tmp_path: Path, signing_key: SigningKey
) -> AsyncIterator[Stack]:
    """The service on each database, over the local blob store."""
    async with running_stack(request.param, tmp_path, signing_key) as running:
        yield running


@pytest.fixture(params=BACKENDS)
async def any_stack(
    request: pytest.FixtureRequest, tmp_path: Path, signing_key: SigningKey, blob_store: BlobStore
) -> AsyncIterator[Stack]:
    """The service on each database and each blob-store adapter."""
    async with running_stack(request.param, tmp_path, signing_key, blobs=blob_store) as running:
        yield running
