"""corral.client's file transfers (upload_file, download_file) through the real edge (Envoy)
to the real storage service: a small file in one WriteFile call and a chunked one, there and back
byte for byte with their progress; then, with a storage stub in between that loses what a
network can lose, a chunk whose answer was lost, one that never arrived and one refused
RATE_LIMITED (each resumed where the server is, nothing sent twice that it had), a download
stream broken midway (reopened at the bytes received, pinned to the same content), bytes that
are not the file's (DataLoss, nothing left behind), and uploads that fail (aborted, their quota
hold given back)."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from corral.client import (
    AlreadyExists,
    Client,
    DataLoss,
    FileChangedError,
    InvalidArgument,
    ResourceExhausted,
    RetryPolicy,
    Unavailable,
    download_file,
    upload_file,
)
from corral.storage.v1 import storage_service_pb2 as pb
from corral.storage.v1 import upload_pb2, workspace_pb2
from tests.clients.edge_platform import Edged

MiB = 1024 * 1024
FAST = RetryPolicy(attempts=4, initial_backoff=0.01, max_backoff=0.05)


@pytest.fixture(scope="module")
async def workspace(edged: Edged) -> str:
    """A workspace of the admin's, made by a service principal on storage's own port (the edge
    does not route CreateWorkspace)."""
    settings = edged.platform.settings
    key = (settings.data_dir / "service-api-key").read_text().strip()
    direct = {n: settings.target_for(n) for n in ("identity", "storage")}
    async with Client(direct) as service, Client(edged.target) as admin:
        await service.exchange_api_key(key)
        login = await admin.login(*edged.admin)
        made = await service.storage.CreateWorkspace(
            pb.CreateWorkspaceRequest(
                workspace=workspace_pb2.Workspace(
                    organization="organizations/default",
                    session="sessions/pyfiles",
                    owner=login.user.name,
                )
            )
        )
    return made.workspace.name


@pytest.fixture
async def admin(edged: Edged) -> AsyncIterator[Client]:
    async with Client(edged.target, retry=FAST) as client:
        await client.login(*edged.admin)
        yield client


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


async def test_small_and_chunked_files_there_and_back(
    admin: Client, workspace: str, tmp_path: Path
) -> None:
    small = random_file(tmp_path / "small.bin", 1000)
    seen: list[tuple[int, int]] = []
    file = await upload_file(
        admin, workspace, "py/small.bin", small, progress=lambda *p: seen.append(p)
    )
    assert (file.path, file.size_bytes) == ("py/small.bin", 1000)
    assert file.sha256 == hashlib.sha256(small.read_bytes()).hexdigest()
    assert seen == [(0, 1000), (1000, 1000)]
    with pytest.raises(AlreadyExists) as refused:
        await upload_file(admin, workspace, "py/small.bin", small)
    assert refused.value.reason == "FILE_EXISTS"

    size = 9 * MiB + 123
    big = random_file(tmp_path / "big.bin", size)
    seen.clear()
    file = await upload_file(
        admin, workspace, "py/big.bin", big, progress=lambda *p: seen.append(p)
    )
    assert file.sha256 == hashlib.sha256(big.read_bytes()).hexdigest()
    assert seen[0] == (0, size) and seen[-1] == (size, size)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert len(seen) == 1 + 5  # 2 MiB chunks
    # Replaced with overwrite, by a chunked upload too.
    again = await upload_file(admin, workspace, "py/small.bin", big, overwrite=True)
    now = (await admin.storage.GetFile(pb.GetFileRequest(name=again.name))).file
    assert (now.path, now.size_bytes, now.sha256) == ("py/small.bin", size, file.sha256)

    seen.clear()
    into = tmp_path / "copy.bin"
    got = await download_file(admin, file.name, into, progress=lambda *p: seen.append(p))
    assert into.read_bytes() == big.read_bytes()
    assert got.sha256 == file.sha256
    assert seen[0] == (0, size) and seen[-1] == (size, size)
    assert sorted(os.listdir(tmp_path)) == ["big.bin", "copy.bin", "small.bin"]  # no .part left
    stream = io.BytesIO()
    await download_file(admin, file.name, stream)
    assert stream.getvalue() == big.read_bytes()


class Storage:
    """The storage stub, with faults: ``lose_answer`` (AppendUploadChunk calls, counted from 1,
    that the server runs but whose answer never arrives), ``drop_before`` (calls that never
    reach it), ``rate_limited`` (calls refused RATE_LIMITED), ``refuse`` (a call answered
    INVALID_ARGUMENT), ``break_stream_after`` (messages
    after which the first DownloadFile stream breaks), ``corrupt`` (flip a byte downloaded)."""

    def __init__(self, real: Any, **faults: Any) -> None:
        self._real = real
        self.faults = faults
        self.appends: list[int] = []  # offsets of the chunks that reached the server
        self.downloads: list[pb.DownloadFileRequest] = []
        self.uploads: list[str] = []
        self._calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    async def CreateUpload(self, request: Any, **kwargs: Any) -> Any:
        reply = await self._real.CreateUpload(request, **kwargs)
        self.uploads.append(reply.upload.name)
        return reply

    async def AppendUploadChunk(self, request: Any, **kwargs: Any) -> Any:
        self._calls += 1
        if self._calls in self.faults.get("drop_before", ()):
            raise Unavailable(grpc.StatusCode.UNAVAILABLE, "connection reset", "UNAVAILABLE")
        if self._calls in self.faults.get("refuse", ()):
            raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, "no", "CHUNK_TOO_LARGE")
        if self._calls in self.faults.get("rate_limited", ()):
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            raise ResourceExhausted(code, "slow down", "RATE_LIMITED", retry_after=0.01)
        reply = await self._real.AppendUploadChunk(request, **kwargs)
        self.appends.append(request.offset)
        if self._calls in self.faults.get("lose_answer", ()):
            raise Unavailable(grpc.StatusCode.UNAVAILABLE, "connection reset", "UNAVAILABLE")
        return reply

    def DownloadFile(self, request: Any, **kwargs: Any) -> Any:
        self.downloads.append(request)
        return _Stream(self, self._real.DownloadFile(request, **kwargs), len(self.downloads))


class _Stream:
    def __init__(self, owner: Storage, call: Any, number: int) -> None:
        self._owner, self._call, self._number = owner, call, number

    def cancel(self) -> bool:
        return bool(self._call.cancel())

    async def __aiter__(self) -> AsyncIterator[pb.DownloadFileResponse]:
        faults = self._owner.faults
        count = 0
        async for message in self._call:
            if self._number == 1 and count == faults.get("break_stream_after"):
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    details="connection reset",
                )
            count += 1
            if faults.get("corrupt") and count == 2:
                data = bytearray(message.data)
                data[0] ^= 1
                message.data = bytes(data)
            yield message


class Faulty(Client):
    """A client whose storage stub is ``Storage`` with these faults."""

    def __init__(self, target: str, **faults: Any) -> None:
        super().__init__(target, retry=FAST)
        self.faults = faults
        self.wrapped: Storage | None = None

    @property
    def storage(self) -> Any:
        if self.wrapped is None:
            self.wrapped = Storage(super().storage, **self.faults)
        return self.wrapped


async def faulty(edged: Edged, **faults: Any) -> tuple[Faulty, Storage]:
    client = Faulty(edged.target, **faults)
    await client.login(*edged.admin)
    stub = client.storage
    return client, stub


async def test_chunks_lost_on_the_way_are_resumed_where_the_server_is(
    edged: Edged, workspace: str, tmp_path: Path
) -> None:
    size = 9 * MiB
    local = random_file(tmp_path / "lossy.bin", size)
    client, stub = await faulty(edged, lose_answer={2}, drop_before={4}, rate_limited={6})
    async with client:
        file = await upload_file(client, workspace, "py/lossy.bin", local, chunk_size=2 * MiB)
        assert file.sha256 == hashlib.sha256(local.read_bytes()).hexdigest()
        # The chunk at 2 MiB was kept though its answer was lost: not sent again. The one at
        # 6 MiB was lost on its way (the 4th call) and sent again from where the server was;
        # the one at 8 MiB was refused RATE_LIMITED (the 6th call) and sent again.
        assert stub.appends == [0, 2 * MiB, 4 * MiB, 6 * MiB, 8 * MiB]
        got = io.BytesIO()
        await download_file(client, file.name, got)
    assert got.getvalue() == local.read_bytes()


async def test_a_broken_download_stream_resumes_at_the_bytes_received(
    edged: Edged, admin: Client, workspace: str, tmp_path: Path
) -> None:
    local = random_file(tmp_path / "stream.bin", 5 * MiB + 7)
    file = await upload_file(admin, workspace, "py/stream.bin", local)
    client, stub = await faulty(edged, break_stream_after=3)
    async with client:
        into = tmp_path / "copy.bin"
        await download_file(client, file.name, into)
    assert into.read_bytes() == local.read_bytes()
    first, second = stub.downloads
    assert (first.offset, first.if_sha256) == (0, "")
    assert (second.offset, second.if_sha256) == (3 * MiB, file.sha256)  # 1 MiB messages


async def test_bytes_that_are_not_the_file_are_refused_and_leave_nothing(
    edged: Edged, admin: Client, workspace: str, tmp_path: Path
) -> None:
    local = random_file(tmp_path / "true.bin", 3 * MiB)
    file = await upload_file(admin, workspace, "py/true.bin", local)
    client, _ = await faulty(edged, corrupt=True)
    async with client:
        with pytest.raises(DataLoss) as lost:
            await download_file(client, file.name, tmp_path / "copy.bin")
    assert lost.value.reason == "CHECKSUM_MISMATCH"
    assert sorted(os.listdir(tmp_path)) == ["true.bin"]


async def test_failed_uploads_are_aborted(
    edged: Edged, admin: Client, workspace: str, tmp_path: Path
) -> None:
    local = random_file(tmp_path / "refused.bin", 5 * MiB)
    client, stub = await faulty(edged, refuse={2})
    async with client:
        with pytest.raises(InvalidArgument):
            await upload_file(client, workspace, "py/refused.bin", local)

        # The local file changing midway: the upload stops and is aborted too.
        def grow(done: int, total: int) -> None:
            if done:
                with local.open("ab") as more:
                    more.write(b"more")

        with pytest.raises(FileChangedError):
            await upload_file(client, workspace, "py/changed.bin", local, progress=grow)
    for name in stub.uploads:
        upload = (await admin.storage.GetUpload(pb.GetUploadRequest(name=name))).upload
        assert upload.state == upload_pb2.Upload.STATE_ABORTED, name
    listed = await admin.storage.ListFiles(pb.ListFilesRequest(parent=workspace, prefix="py/"))
    assert not {"py/refused.bin", "py/changed.bin"} & {f.path for f in listed.files}
