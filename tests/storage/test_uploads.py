"""Resumable uploads through the gRPC API, on each database and each blob-store adapter."""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from corral.storage.v1 import storage_service_pb2 as pb
from corral.storage.v1 import storage_service_pb2_grpc as rpc
from corral.storage.v1 import upload_pb2
from tests.storage.stack import ALICE, Stack, sha
from tests.support.grpc_tools import error_reason
from tests.support.proxy import TcpProxy

MiB = 1024 * 1024
CHUNK = 2 * MiB


async def create(
    stack: Stack, ws: str, path: str, size: int = 0, **kw: object
) -> upload_pb2.Upload:
    reply = await stack.stub.CreateUpload(
        pb.CreateUploadRequest(
            parent=ws,
            upload=upload_pb2.Upload(path=path, size_bytes=size, **kw),  # type: ignore[arg-type]
            request_id=str(uuid.uuid4()),
        ),
        metadata=stack.auth(),
    )
    return reply.upload


async def append(stack: Stack, name: str, offset: int, data: bytes) -> int:
    reply = await stack.stub.AppendUploadChunk(
        pb.AppendUploadChunkRequest(name=name, offset=offset, data=data), metadata=stack.auth()
    )
    return reply.committed_bytes


async def staged_blobs(stack: Stack) -> tuple[list[str], list[str]]:
    objects = [b.key async for b in stack.blobs.list("uploads/")]
    multipart = [m.key async for m in stack.blobs.list_multipart("uploads/")]
    return objects, multipart


async def test_a_100_mib_upload_resumes_after_a_dropped_connection(any_stack: Stack) -> None:
    stack = any_stack
    ws = await stack.workspace()
    content = os.urandom(100 * MiB)
    upload = await create(stack, ws.name, "data/big.bin", size=len(content))
    assert upload.state == upload_pb2.Upload.STATE_ACTIVE
    assert stack.ledger.in_use(ALICE) == len(content)  # held up front for a declared size

    host, port = stack.address.rsplit(":", 1)
    proxy = TcpProxy(host, int(port))
    await proxy.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}")
    stub = rpc.StorageServiceStub(channel)
    offset = 0
    with pytest.raises(grpc.aio.AioRpcError) as dropped:
        while offset < len(content):
            call = stub.AppendUploadChunk(
                pb.AppendUploadChunkRequest(
                    name=upload.name, offset=offset, data=content[offset : offset + CHUNK]
                ),
                metadata=stack.auth(),
            )
            if offset >= 40 * MiB:
                await proxy.cut()  # the connection drops with this chunk in flight
            offset = (await call).committed_bytes
    assert dropped.value.code() == grpc.StatusCode.UNAVAILABLE
    await channel.close()

    resumed = await stack.stub.GetUpload(
        pb.GetUploadRequest(name=upload.name), metadata=stack.auth()
    )
    offset = resumed.upload.committed_bytes
    assert offset in (40 * MiB, 42 * MiB)  # the chunk in flight arrived or it did not
    while offset < len(content):
        offset = await append(stack, upload.name, offset, content[offset : offset + CHUNK])
    committed = await stack.stub.CommitUpload(
        pb.CommitUploadRequest(name=upload.name, sha256=sha(content)), metadata=stack.auth()
    )
    assert (committed.file.path, committed.file.size_bytes) == ("data/big.bin", len(content))
    assert committed.file.sha256 == sha(content)
    on_disk = hashlib.sha256((stack.workspace_dir(ws.name) / "data" / "big.bin").read_bytes())
    assert on_disk.hexdigest() == sha(content)
    again = await stack.stub.CommitUpload(
        pb.CommitUploadRequest(name=upload.name, sha256=sha(content)), metadata=stack.auth()
    )
    assert again.file.name == committed.file.name  # a retried commit answers the same file
    await stack.settle()
    assert stack.ledger.in_use(ALICE) == len(content)
    assert [r.settled for r in stack.ledger.live()] == [len(content)]
    assert await staged_blobs(stack) == ([], [])


async def test_quota_exceeded_mid_upload_leaves_nothing_behind(any_stack: Stack) -> None:
    stack = any_stack
    ws = await stack.workspace()
    stack.ledger.limits[ALICE] = 5 * MiB
    upload = await create(stack, ws.name, "too-big.bin")  # size unknown: held chunk by chunk
    offset = 0
    for _ in range(2):
        offset = await append(stack, upload.name, offset, b"a" * CHUNK)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await append(stack, upload.name, offset, b"a" * CHUNK)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(refused.value) == "STORAGE_QUOTA_EXCEEDED"
    ended = await stack.stub.GetUpload(pb.GetUploadRequest(name=upload.name), metadata=stack.auth())
    assert ended.upload.state == upload_pb2.Upload.STATE_FAILED
    assert ended.upload.failure_reason == "STORAGE_QUOTA_EXCEEDED"
    with pytest.raises(grpc.aio.AioRpcError) as after:
        await append(stack, upload.name, offset, b"a")
    assert error_reason(after.value) == "UPLOAD_NOT_ACTIVE"
    await stack.settle()
    assert list(stack.workspace_dir(ws.name).iterdir()) == []  # no partial file
    assert stack.ledger.live() == [] and stack.ledger.in_use(ALICE) == 0  # no leaked hold
    assert await staged_blobs(stack) == ([], [])
    assert "storage.uploads.failed" in stack.audit.actions()


async def test_offsets_retries_and_sizes(stack: Stack) -> None:
    ws = await stack.workspace()
    upload = await create(stack, ws.name, "f.txt", size=10)
    assert await append(stack, upload.name, 0, b"01234") == 5
    assert await append(stack, upload.name, 0, b"01234") == 5  # the same chunk again: no-op
    with pytest.raises(grpc.aio.AioRpcError) as gap:
        await append(stack, upload.name, 7, b"789")
    assert error_reason(gap.value) == "OFFSET_MISMATCH"
    status = grpc_status_metadata(gap.value)
    assert status["committed_bytes"] == "5"
    with pytest.raises(grpc.aio.AioRpcError) as past:
        await append(stack, upload.name, 5, b"567890")
    assert error_reason(past.value) == "SIZE_MISMATCH"
    with pytest.raises(grpc.aio.AioRpcError) as short:
        await stack.stub.CommitUpload(
            pb.CommitUploadRequest(name=upload.name, sha256=sha(b"01234")), metadata=stack.auth()
        )
    assert error_reason(short.value) == "SIZE_MISMATCH"
    ended = await stack.stub.GetUpload(pb.GetUploadRequest(name=upload.name), metadata=stack.auth())
    assert ended.upload.state == upload_pb2.Upload.STATE_FAILED
    await stack.settle()
    assert stack.ledger.live() == []


async def test_a_wrong_checksum_fails_the_upload_and_writes_nothing(any_stack: Stack) -> None:
    stack = any_stack
    ws = await stack.workspace()
    upload = await create(stack, ws.name, "f.bin")
    await append(stack, upload.name, 0, b"real bytes")
    with pytest.raises(grpc.aio.AioRpcError) as wrong:
        await stack.stub.CommitUpload(
            pb.CommitUploadRequest(name=upload.name, sha256=sha(b"other bytes")),
            metadata=stack.auth(),
        )
    assert error_reason(wrong.value) == "CHECKSUM_MISMATCH"
    assert list(stack.workspace_dir(ws.name).iterdir()) == []
    await stack.settle()
    assert stack.ledger.live() == [] and await staged_blobs(stack) == ([], [])


async def test_small_chunks_and_an_empty_file(any_stack: Stack) -> None:
    stack = any_stack
    ws = await stack.workspace()
    content = os.urandom(300 * 1024)
    upload = await create(stack, ws.name, "small-chunks.bin")
    offset = 0
    while offset < len(content):
        offset = await append(stack, upload.name, offset, content[offset : offset + 7000])
    done = await stack.stub.CommitUpload(
        pb.CommitUploadRequest(name=upload.name, sha256=sha(content)), metadata=stack.auth()
    )
    assert done.file.size_bytes == len(content)
    assert (stack.workspace_dir(ws.name) / "small-chunks.bin").read_bytes() == content
    empty = await create(stack, ws.name, "empty")
    made = await stack.stub.CommitUpload(
        pb.CommitUploadRequest(name=empty.name, sha256=sha(b"")), metadata=stack.auth()
    )
    assert made.file.size_bytes == 0 and (stack.workspace_dir(ws.name) / "empty").exists()
    await stack.settle()
    assert await staged_blobs(stack) == ([], [])


async def test_abort_gives_everything_back(stack: Stack) -> None:
    ws = await stack.workspace()
    upload = await create(stack, ws.name, "f.bin", size=1000)
    await append(stack, upload.name, 0, b"x" * 500)
    aborted = await stack.stub.AbortUpload(
        pb.AbortUploadRequest(name=upload.name), metadata=stack.auth()
    )
    assert aborted.upload.state == upload_pb2.Upload.STATE_ABORTED
    again = await stack.stub.AbortUpload(
        pb.AbortUploadRequest(name=upload.name), metadata=stack.auth()
    )
    assert again.upload.state == upload_pb2.Upload.STATE_ABORTED
    await stack.settle()
    assert stack.ledger.live() == [] and await staged_blobs(stack) == ([], [])
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await stack.stub.CommitUpload(
            pb.CommitUploadRequest(name=upload.name, sha256=sha(b"x" * 500)), metadata=stack.auth()
        )
    assert error_reason(ended.value) == "UPLOAD_NOT_ACTIVE"


async def test_an_existing_file_is_kept_unless_overwrite(stack: Stack) -> None:
    ws = await stack.workspace()
    (stack.workspace_dir(ws.name) / "taken").write_bytes(b"first")
    with pytest.raises(grpc.aio.AioRpcError) as exists:
        await create(stack, ws.name, "taken")
    assert error_reason(exists.value) == "FILE_EXISTS"
    upload = await create(stack, ws.name, "later")
    await append(stack, upload.name, 0, b"second")
    (stack.workspace_dir(ws.name) / "later").write_bytes(b"the agent was first")
    with pytest.raises(grpc.aio.AioRpcError) as appeared:
        await stack.stub.CommitUpload(
            pb.CommitUploadRequest(name=upload.name, sha256=sha(b"second")), metadata=stack.auth()
        )
    assert error_reason(appeared.value) == "FILE_EXISTS"
    still = await stack.stub.GetUpload(pb.GetUploadRequest(name=upload.name), metadata=stack.auth())
    assert still.upload.state == upload_pb2.Upload.STATE_ACTIVE  # move the file and commit again
    (stack.workspace_dir(ws.name) / "later").unlink()
    await stack.stub.CommitUpload(
        pb.CommitUploadRequest(name=upload.name, sha256=sha(b"second")), metadata=stack.auth()
    )
    replace = await create(stack, ws.name, "taken", overwrite=True)
    await append(stack, replace.name, 0, b"replaced")
    await stack.stub.CommitUpload(
        pb.CommitUploadRequest(name=replace.name, sha256=sha(b"replaced")), metadata=stack.auth()
    )
    assert (stack.workspace_dir(ws.name) / "taken").read_bytes() == b"replaced"
    await stack.settle()
    assert stack.ledger.in_use(ALICE) == len(b"second") + len(b"replaced")


async def test_concurrent_appends_are_one_at_a_time(stack: Stack) -> None:
    ws = await stack.workspace()
    upload = await create(stack, ws.name, "race")
    results = await asyncio.gather(
        *(append(stack, upload.name, 0, bytes([n]) * 100_000) for n in range(4)),
        return_exceptions=True,
    )
    won = [r for r in results if isinstance(r, int)]
    assert won and all(r == 100_000 for r in won)
    for lost in results:
        if isinstance(lost, grpc.aio.AioRpcError):
            assert error_reason(lost) in {"UPLOAD_BUSY", "OFFSET_MISMATCH"}
    got = await stack.stub.GetUpload(pb.GetUploadRequest(name=upload.name), metadata=stack.auth())
    assert got.upload.committed_bytes == 100_000


async def test_create_is_idempotent(stack: Stack) -> None:
    ws = await stack.workspace()
    request = pb.CreateUploadRequest(
        parent=ws.name,
        upload=upload_pb2.Upload(path="f", size_bytes=5),
        request_id=str(uuid.uuid4()),
    )
    first = await stack.stub.CreateUpload(request, metadata=stack.auth())
    again = await stack.stub.CreateUpload(request, metadata=stack.auth())
    assert first.upload.name == again.upload.name
    assert stack.ledger.in_use(ALICE) == 5  # held once


def grpc_status_metadata(error: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return dict(info.metadata)
    return {}
