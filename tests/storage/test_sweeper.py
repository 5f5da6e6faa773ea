"""Retention runs once across replicas; agent writes are measured and reconciled; holds are
given back even when identity is down for a while."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import timedelta

import sqlalchemy as sa

from corral.services.storage.domain import now
from corral.services.storage.tables import leases, outbox, uploads
from corral.storage.v1 import storage_service_pb2 as pb
from corral.storage.v1 import upload_pb2
from tests.storage.stack import ALICE, Stack


async def expire_uploads(stack: Stack) -> None:
    async with stack.engine.begin() as connection:
        await connection.execute(uploads.update().values(expire_time=now() - timedelta(seconds=1)))


async def test_the_sweeper_runs_once_with_two_replicas(stack: Stack) -> None:
    ws = await stack.workspace()
    upload = await stack.stub.CreateUpload(
        pb.CreateUploadRequest(parent=ws.name, upload=upload_pb2.Upload(path="f", size_bytes=10)),
        metadata=stack.auth(),
    )
    await stack.stub.AppendUploadChunk(
        pb.AppendUploadChunkRequest(name=upload.upload.name, offset=0, data=b"12345"),
        metadata=stack.auth(),
    )
    await expire_uploads(stack)
    first, second = stack.make_replica(), stack.make_replica()
    stack.replicas += [first, second]
    rounds = await asyncio.gather(first.service.sweeper.sweep(), second.service.sweeper.sweep())
    ran = [r for r in rounds if r is not None]
    assert len(ran) == 1 and ran[0].uploads_expired == 1 and not ran[0].errors
    leader, other = (first, second) if rounds[0] is not None else (second, first)
    assert await other.service.sweeper.sweep() is None  # the lease holds
    assert await leader.service.sweeper.sweep() is not None  # and its holder renews it
    await stack.settle()
    assert stack.audit.actions().count("storage.uploads.expired") == 1
    assert stack.ledger.live() == []
    got = await stack.stub.GetUpload(
        pb.GetUploadRequest(name=upload.upload.name), metadata=stack.auth()
    )
    assert got.upload.state == upload_pb2.Upload.STATE_EXPIRED
    async with stack.engine.begin() as connection:  # the leader dies: its lease lapses
        await connection.execute(leases.update().values(until=now() - timedelta(seconds=1)))
    assert await other.service.sweeper.sweep() is not None


async def test_agent_writes_are_measured_and_reconciled(stack: Stack) -> None:
    ws = await stack.workspace()
    directory = stack.workspace_dir(ws.name)
    (directory / "made-by-agent.bin").write_bytes(os.urandom(1000))
    (directory / "outside").symlink_to("/usr/bin/env")  # links are not the workspace's bytes
    done = await stack.service.sweeper.sweep()
    assert done is not None and done.workspaces_measured == 1
    got = await stack.stub.GetWorkspace(pb.GetWorkspaceRequest(name=ws.name), metadata=stack.auth())
    assert (got.workspace.size_bytes, got.workspace.file_count) == (1000, 1)
    assert stack.ledger.in_use(ALICE) == 1000  # recorded, whatever the limits: already written
    (directory / "made-by-agent.bin").unlink()
    await stack.service.sweeper.sweep()
    await stack.settle()
    assert stack.ledger.in_use(ALICE) == 0 and stack.ledger.live() == []


async def test_releases_wait_out_an_identity_outage(stack: Stack) -> None:
    ws = await stack.workspace()
    await stack.stub.WriteFile(
        pb.WriteFileRequest(parent=ws.name, path="f", data=b"x" * 64), metadata=stack.auth()
    )
    stack.ledger.down = True
    await stack.stub.DeleteWorkspace(
        pb.DeleteWorkspaceRequest(name=ws.name), metadata=stack.as_service()
    )
    await stack.settle()
    assert stack.ledger.in_use(ALICE) == 64  # identity did not hear about it yet
    stack.ledger.down = False
    async with stack.engine.begin() as connection:  # the retry is due (skip the backoff)
        await connection.execute(outbox.update().values(next_attempt=now()))
    await stack.service.storage.outbox.drain()
    assert stack.ledger.in_use(ALICE) == 0 and stack.ledger.live() == []
    async with stack.engine.connect() as connection:
        left = (await connection.execute(sa.select(sa.func.count()).select_from(outbox))).scalar()
    assert left == 0


async def test_orphaned_multipart_uploads_are_aborted(stack: Stack) -> None:
    orphan = await stack.blobs.begin_multipart("uploads/ghost")
    old = time.time() - 2 * 24 * 3600
    os.utime(stack.root / "blobs" / "multipart" / orphan / "key", (old, old))
    ws = await stack.workspace()
    live = await stack.stub.CreateUpload(
        pb.CreateUploadRequest(parent=ws.name, upload=upload_pb2.Upload(path="f")),
        metadata=stack.auth(),
    )
    done = await stack.service.sweeper.sweep()
    assert done is not None and done.multipart_aborted == 1
    remaining = [m.key async for m in stack.blobs.list_multipart("uploads/")]
    assert remaining == [f"uploads/{live.upload.name.rsplit('/', 1)[1]}"]
