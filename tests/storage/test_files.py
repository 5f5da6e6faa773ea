"""Files through the gRPC API: the workspace's directory is what is listed (an agent's file
shows up at once), one-call writes, moves, deletes, and ranged, resumable downloads."""

from __future__ import annotations

import os

import grpc
import pytest

from corral.services.storage.base import Limits
from corral.services.storage.paths import file_name
from corral.storage.v1 import storage_service_pb2 as pb
from tests.storage.stack import ALICE, Stack, running_stack, sha
from tests.support.grpc_tools import error_reason
from tests.support.keys import SigningKey
from tests.support.proxy import TcpProxy


async def write(
    stack: Stack, ws: str, path: str, data: bytes, **kw: object
) -> pb.WriteFileResponse:
    return await stack.stub.WriteFile(
        pb.WriteFileRequest(parent=ws, path=path, data=data, **kw),  # type: ignore[arg-type]
        metadata=stack.auth(),
    )


async def download(
    stack: Stack, name: str, **kw: object
) -> tuple[bytes, list[pb.DownloadFileResponse]]:
    replies = [
        r
        async for r in stack.stub.DownloadFile(
            pb.DownloadFileRequest(name=name, **kw),
            metadata=stack.auth(),  # type: ignore[arg-type]
        )
    ]
    return b"".join(r.data for r in replies), replies


async def test_a_file_the_agent_wrote_is_listed_and_downloaded_at_once(stack: Stack) -> None:
    ws = await stack.workspace()
    directory = stack.workspace_dir(ws.name)
    (directory / "out").mkdir()
    (directory / "out" / "result.json").write_bytes(b'{"ok": true}')
    listed = await stack.stub.ListFiles(pb.ListFilesRequest(parent=ws.name), metadata=stack.auth())
    assert [(f.path, f.size_bytes, f.content_type) for f in listed.files] == [
        ("out/result.json", 12, "application/json")
    ]
    got = await stack.stub.GetFile(
        pb.GetFileRequest(name=listed.files[0].name), metadata=stack.auth()
    )
    assert got.file.sha256 == sha(b'{"ok": true}')
    data, replies = await download(stack, got.file.name)
    assert data == b'{"ok": true}' and replies[0].file.sha256 == got.file.sha256


async def test_listing_is_a_directory_view_in_byte_order(stack: Stack) -> None:
    ws = await stack.workspace()
    for path in ("a/b", "a-c", "a/b2/c", "ab", "z/y/x", "top.txt", "é.txt"):
        await write(stack, ws.name, path, path.encode())

    async def listing(prefix: str = "", delimiter: str = "") -> tuple[list[str], list[str]]:
        reply = await stack.stub.ListFiles(
            pb.ListFilesRequest(parent=ws.name, prefix=prefix, delimiter=delimiter),
            metadata=stack.auth(),
        )
        return [f.path for f in reply.files], list(reply.prefixes)

    everything = ["a-c", "a/b", "a/b2/c", "ab", "top.txt", "z/y/x", "é.txt"]
    assert await listing() == (everything, [])
    assert await listing(delimiter="/") == (["a-c", "ab", "top.txt", "é.txt"], ["a/", "z/"])
    assert await listing("a/", "/") == (["a/b"], ["a/b2/"])
    assert await listing("a") == (["a-c", "a/b", "a/b2/c", "ab"], [])
    assert await listing("z/y/") == (["z/y/x"], [])
    assert await listing("nothing/") == ([], [])


async def test_listing_pages_resume_after_the_last_key(stack: Stack) -> None:
    ws = await stack.workspace()
    directory = stack.workspace_dir(ws.name)
    expected = []
    for d in ("d1", "d2"):
        (directory / d).mkdir()
        for n in range(7):
            (directory / d / f"f{n}").write_bytes(b"x")
            expected.append(f"{d}/f{n}")
    seen: list[str] = []
    token = ""
    while True:
        reply = await stack.stub.ListFiles(
            pb.ListFilesRequest(parent=ws.name, page_size=3, page_token=token),
            metadata=stack.auth(),
        )
        seen += [f.path for f in reply.files]
        token = reply.next_page_token
        if not token:
            break
    assert seen == expected
    with pytest.raises(grpc.aio.AioRpcError) as other_query:
        await stack.stub.ListFiles(
            pb.ListFilesRequest(
                parent=ws.name, prefix="d1/", page_token=reply.next_page_token or "x"
            ),
            metadata=stack.auth(),
        )
    assert other_query.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_write_replaces_only_when_asked_and_compares_and_swaps(stack: Stack) -> None:
    ws = await stack.workspace()
    first = await write(stack, ws.name, "doc.md", b"one", content_type="text/x-custom")
    assert first.file.content_type == "text/x-custom"
    assert first.file.name == file_name(ws.name.removeprefix("workspaces/"), "doc.md")
    with pytest.raises(grpc.aio.AioRpcError) as exists:
        await write(stack, ws.name, "doc.md", b"two")
    assert error_reason(exists.value) == "FILE_EXISTS"
    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await write(stack, ws.name, "doc.md", b"two", overwrite=True, if_sha256=sha(b"zzz"))
    assert error_reason(stale.value) == "FILE_CHANGED"
    swapped = await write(stack, ws.name, "doc.md", b"two", overwrite=True, if_sha256=sha(b"one"))
    assert swapped.file.sha256 == sha(b"two")
    assert (stack.workspace_dir(ws.name) / "doc.md").read_bytes() == b"two"
    await stack.settle()
    assert stack.ledger.in_use(ALICE) == 3  # what the workspace holds now, measured


async def test_write_is_refused_over_the_size_limits(tmp_path, signing_key: SigningKey) -> None:  # type: ignore[no-untyped-def]
    async with running_stack(
        "sqlite", tmp_path, signing_key, limits=Limits(max_file_bytes=100, max_workspace_bytes=150)
    ) as stack:
        ws = await stack.workspace()
        with pytest.raises(grpc.aio.AioRpcError) as big:
            await write(stack, ws.name, "big", b"x" * 101)
        assert error_reason(big.value) == "FILE_TOO_LARGE"
        await write(stack, ws.name, "one", b"x" * 100)
        with pytest.raises(grpc.aio.AioRpcError) as full:
            await write(stack, ws.name, "two", b"x" * 60)
        assert error_reason(full.value) == "WORKSPACE_FULL"
        with pytest.raises(grpc.aio.AioRpcError) as chunk:
            await write(stack, ws.name, "huge", b"x" * (4 * 1024 * 1024 + 1))
        assert error_reason(chunk.value) == "CHUNK_TOO_LARGE"
        assert stack.ledger.in_use(ALICE) == 100


async def test_write_is_refused_over_the_quota_and_keeps_nothing(stack: Stack) -> None:
    ws = await stack.workspace()
    stack.ledger.limits[ALICE] = 10
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await write(stack, ws.name, "f", b"x" * 11)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(refused.value) == "STORAGE_QUOTA_EXCEEDED"
    assert list(stack.workspace_dir(ws.name).iterdir()) == []
    await stack.settle()
    assert stack.ledger.live() == []


async def test_move_and_delete(stack: Stack) -> None:
    ws = await stack.workspace()
    a = await write(stack, ws.name, "a.txt", b"alpha")
    await write(stack, ws.name, "b.txt", b"beta")
    with pytest.raises(grpc.aio.AioRpcError) as exists:
        await stack.stub.MoveFile(
            pb.MoveFileRequest(name=a.file.name, destination_path="b.txt"), metadata=stack.auth()
        )
    assert error_reason(exists.value) == "FILE_EXISTS"
    moved = await stack.stub.MoveFile(
        pb.MoveFileRequest(name=a.file.name, destination_path="dir/c.txt"), metadata=stack.auth()
    )
    assert (moved.file.path, moved.file.sha256) == ("dir/c.txt", sha(b"alpha"))
    directory = stack.workspace_dir(ws.name)
    assert not (directory / "a.txt").exists()
    with pytest.raises(grpc.aio.AioRpcError) as changed:
        await stack.stub.DeleteFile(
            pb.DeleteFileRequest(name=moved.file.name, if_sha256=sha(b"other")),
            metadata=stack.auth(),
        )
    assert error_reason(changed.value) == "FILE_CHANGED"
    await stack.stub.DeleteFile(pb.DeleteFileRequest(name=moved.file.name), metadata=stack.auth())
    assert not (directory / "dir" / "c.txt").exists()
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await stack.stub.GetFile(pb.GetFileRequest(name=moved.file.name), metadata=stack.auth())
    assert error_reason(gone.value) == "FILE_NOT_FOUND"
    await stack.settle()
    assert stack.ledger.in_use(ALICE) == 4
    assert stack.audit.actions().count("storage.files.move") == 1


async def test_a_ranged_download_resumes_after_a_dropped_connection(stack: Stack) -> None:
    ws = await stack.workspace()
    # Far more than what can be in flight (flow-control windows, socket and proxy buffers) when
    # the connection drops after the first chunk.
    content = os.urandom(48 * 1024 * 1024 + 123)
    (stack.workspace_dir(ws.name) / "big.bin").write_bytes(content)
    name = file_name(ws.name.removeprefix("workspaces/"), "big.bin")
    host, port = stack.address.rsplit(":", 1)
    proxy = TcpProxy(host, int(port))
    await proxy.start()
    received = bytearray()
    digest = ""
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}")
    call = pb_stub(channel).DownloadFile(pb.DownloadFileRequest(name=name), metadata=stack.auth())
    with pytest.raises(grpc.aio.AioRpcError) as dropped:
        async for reply in call:
            if reply.HasField("file"):
                digest = reply.file.sha256
            assert reply.offset == len(received)
            received += reply.data
            if len(received) == 1024 * 1024:
                await proxy.cut()  # the connection drops in the middle of the stream
    assert dropped.value.code() == grpc.StatusCode.UNAVAILABLE
    await channel.close()
    assert 0 < len(received) < len(content)
    rest, replies = await download(stack, name, offset=len(received), if_sha256=digest)
    assert replies[0].offset == len(received)
    assert sha(bytes(received) + rest) == sha(content) == digest
    part, _ = await download(stack, name, offset=10, limit=20)
    assert part == content[10:30]


async def test_a_resumed_download_of_changed_content_is_refused(stack: Stack) -> None:
    ws = await stack.workspace()
    first = await write(stack, ws.name, "f", b"version one")
    (stack.workspace_dir(ws.name) / "f").write_bytes(b"version two!")  # the agent rewrites it
    with pytest.raises(grpc.aio.AioRpcError) as changed:
        await download(stack, first.file.name, offset=3, if_sha256=first.file.sha256)
    assert changed.value.code() == grpc.StatusCode.ABORTED
    assert error_reason(changed.value) == "FILE_CHANGED"
    with pytest.raises(grpc.aio.AioRpcError) as past:
        await download(stack, first.file.name, offset=100)
    assert error_reason(past.value) == "RANGE_NOT_SATISFIABLE"
    empty, replies = await download(stack, first.file.name, offset=12)
    assert empty == b"" and len(replies) == 1 and replies[0].file.size_bytes == 12


def pb_stub(channel: grpc.aio.Channel):  # type: ignore[no-untyped-def]
    from corral.storage.v1 import storage_service_pb2_grpc

    return storage_service_pb2_grpc.StorageServiceStub(channel)
