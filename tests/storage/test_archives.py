"""Archives built from a hostile agent's workspace into each blob store, streamed: what is in
them (and what never is), that they extract to the same bytes, bounded memory, clean failures."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import socket
import stat
import tarfile
import uuid
import zipfile
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from corral.libs.errors import NotFound
from corral.services.storage.archives import (
    ArchiveTooLarge,
    SourceChanged,
    WorkspaceArchiver,
    build_archive,
)
from corral.services.storage.blobs import BlobInfo, BlobStore
from corral.services.storage.domain import Archive, ArchiveFormat
from corral.services.storage.workspace_fs import WorkspaceFiles
from corral.storage.v1 import archive_pb2
from corral.storage.v1 import storage_service_pb2 as pb
from tests.storage.stack import running_stack
from tests.support.keys import SigningKey

MiB = 1024 * 1024
FORMATS = [ArchiveFormat.TAR_GZ, ArchiveFormat.ZIP]
PROTO_FORMATS = {
    ArchiveFormat.TAR_GZ: archive_pb2.Archive.FORMAT_TAR_GZ,
    ArchiveFormat.ZIP: archive_pb2.Archive.FORMAT_ZIP,
}


# -- a workspace as an agent may leave it ------------------------------------------------------


def make_workspace(root: Path) -> dict[str, bytes]:
    """Files an archive must carry (path -> bytes), among things it must leave out."""
    workspace = root / "ws"
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"another tenant's secret")
    wanted = {
        "a.txt": b"hello\n",
        "src/main.py": b"print('hi')\n",
        "src/pkg/__init__.py": b"",
        "src/pkg/deep/data.bin": os.urandom(300_000),
        "caf\u00e9/notes.md": "# caf\u00e9\n".encode(),
    }
    for path, data in wanted.items():
        (workspace / path).parent.mkdir(parents=True, exist_ok=True)
        (workspace / path).write_bytes(data)
    (workspace / "src/main.py").chmod(0o755)
    (workspace / "empty").mkdir()
    # What an agent can plant: links out of the workspace and inside it, special files, and
    # names no workspace path can address (an extractor elsewhere could read them as paths).
    (workspace / "escape-file").symlink_to(outside / "secret")
    (workspace / "escape-dir").symlink_to(outside, target_is_directory=True)
    (workspace / "src/pkg/etc-passwd").symlink_to("/etc/passwd")
    (workspace / "src/up").symlink_to("../..", target_is_directory=True)
    (workspace / "inner-link").symlink_to("a.txt")
    os.mkfifo(workspace / "fifo")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(workspace / "src/socket"))
    (workspace / "back\\..\\..\\slash").write_bytes(b"x")
    (workspace / "new\nline").write_bytes(b"x")
    return wanted


WANTED_DIRS = {"src", "src/pkg", "src/pkg/deep", "empty", "caf\u00e9"}


async def fetch(store: BlobStore, key: str, target: Path) -> Path:
    with target.open("wb") as out:
        async for block in await store.get(key):
            out.write(block)
    return target


def members(path: Path, format: ArchiveFormat) -> Iterator[tuple[str, str, int, bytes]]:
    """(name, kind "file"/"dir", permission bits, bytes) of every entry, in archive order."""
    if format is ArchiveFormat.TAR_GZ:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                assert member.isfile() or member.isdir(), f"{member.name}: {member.type!r}"
                data = b""
                if member.isfile():
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    data = extracted.read()
                kind = "file" if member.isfile() else "dir"
                yield member.name, kind, member.mode, data
        return
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        for info in archive.infolist():
            mode = info.external_attr >> 16
            assert stat.S_ISREG(mode) or stat.S_ISDIR(mode), info.filename
            if info.is_dir():
                yield info.filename.rstrip("/"), "dir", stat.S_IMODE(mode), b""
            else:
                yield info.filename, "file", stat.S_IMODE(mode), archive.read(info)


@pytest.mark.parametrize("format", FORMATS, ids=lambda f: f.value)
async def test_an_archive_carries_the_files_and_nothing_an_agent_planted(
    blob_store: BlobStore, tmp_path: Path, format: ArchiveFormat
) -> None:
    wanted = make_workspace(tmp_path)
    built = await build_archive(tmp_path / "ws", format, blob_store, "archives/ws/a1")
    blob = await blob_store.stat("archives/ws/a1")
    assert (built.size_bytes, built.file_count) == (blob.size, len(wanted))
    local = await fetch(blob_store, "archives/ws/a1", tmp_path / "archive")
    assert built.sha256 == hashlib.sha256(local.read_bytes()).hexdigest()

    entries = list(members(local, format))
    files = {name: data for name, kind, _, data in entries if kind == "file"}
    assert files == wanted  # byte for byte; no link, FIFO, socket or odd name came along
    assert {name for name, kind, _, _ in entries if kind == "dir"} == WANTED_DIRS
    modes = {name: mode for name, _, mode, _ in entries}
    assert modes["src/main.py"] == 0o755 and modes["a.txt"] == 0o644
    assert b"another tenant's secret" not in local.read_bytes()
    assert all(not name.startswith(("/", "..")) and ".." not in name.split("/") for name in files)


@pytest.mark.parametrize("format", FORMATS, ids=lambda f: f.value)
async def test_one_directory_of_the_workspace(
    blob_store: BlobStore, tmp_path: Path, format: ArchiveFormat
) -> None:
    wanted = make_workspace(tmp_path)
    built = await build_archive(
        tmp_path / "ws", format, blob_store, "archives/ws/a2", path_prefix="src/pkg"
    )
    local = await fetch(blob_store, "archives/ws/a2", tmp_path / "archive")
    files = {name: data for name, kind, _, data in members(local, format) if kind == "file"}
    assert files == {
        path: wanted[path] for path in ("src/pkg/__init__.py", "src/pkg/deep/data.bin")
    }
    assert built.file_count == 2


@pytest.mark.parametrize("prefix", ["missing", "a.txt", "escape-dir", "src/up", "src/up/ws"])
async def test_a_directory_that_is_not_one_fails_cleanly(
    blob_store: BlobStore, tmp_path: Path, prefix: str
) -> None:
    make_workspace(tmp_path)
    with pytest.raises(NotFound) as raised:
        await build_archive(
            tmp_path / "ws", ArchiveFormat.ZIP, blob_store, "archives/x", path_prefix=prefix
        )
    assert raised.value.reason == "FILE_NOT_FOUND"
    assert [info async for info in blob_store.list()] == []


async def test_a_missing_workspace_fails_cleanly(blob_store: BlobStore, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        await build_archive(tmp_path / "gone", ArchiveFormat.TAR_GZ, blob_store, "archives/x")
    assert [info async for info in blob_store.list()] == []


@pytest.mark.parametrize("format", FORMATS, ids=lambda f: f.value)
async def test_too_large_an_archive_keeps_nothing(
    blob_store: BlobStore, tmp_path: Path, format: ArchiveFormat
) -> None:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    write_random(workspace / "big.bin", 12)  # the thread would block on a full pipe if unheard
    with pytest.raises(ArchiveTooLarge) as raised:
        await build_archive(workspace, format, blob_store, "archives/big", max_bytes=2 * MiB)
    assert raised.value.reason == "ARCHIVE_TOO_LARGE"
    assert [info async for info in blob_store.list()] == []
    assert [upload async for upload in blob_store.list_multipart()] == []


class FailingStore:
    """A store whose put takes ``after`` blocks, calls ``meanwhile``, then fails or goes on."""

    def __init__(self, store: BlobStore, *, after: int, meanwhile: object = None) -> None:
        self._store, self._after, self._meanwhile = store, after, meanwhile

    async def put(
        self, key: str, chunks: AsyncIterable[bytes], *, max_bytes: int | None = None
    ) -> BlobInfo:
        async def watched() -> AsyncIterator[bytes]:
            seen = 0
            async for chunk in chunks:
                seen += 1
                if seen == self._after:
                    if self._meanwhile is None:
                        raise ConnectionError("the store went away")
                    self._meanwhile()  # type: ignore[operator]
                yield chunk

        return await self._store.put(key, watched(), max_bytes=max_bytes)


async def test_a_store_that_fails_midway_stops_the_build(tmp_path: Path) -> None:
    from corral.services.storage.blob_local import LocalBlobStore

    workspace = tmp_path / "ws"
    workspace.mkdir()
    write_random(workspace / "big.bin", 24)
    local = LocalBlobStore(tmp_path / "blobs")
    store = FailingStore(local, after=1)
    with pytest.raises(ConnectionError):
        await build_archive(workspace, ArchiveFormat.TAR_GZ, store, "archives/a")  # type: ignore[arg-type]
    assert [info async for info in local.list()] == []


async def test_a_file_that_shrinks_while_packed_fails_the_build(tmp_path: Path) -> None:
    from corral.services.storage.blob_local import LocalBlobStore

    workspace = tmp_path / "ws"
    workspace.mkdir()
    write_random(workspace / "big.bin", 24)  # more than the pipe holds: the reader is mid-file
    local = LocalBlobStore(tmp_path / "blobs")
    store = FailingStore(local, after=1, meanwhile=lambda: os.truncate(workspace / "big.bin", 0))
    for format in FORMATS:
        with pytest.raises(SourceChanged) as raised:
            await build_archive(workspace, format, store, "archives/a")  # type: ignore[arg-type]
        assert raised.value.reason == "FILE_CHANGED"
        write_random(workspace / "big.bin", 24)
    assert [info async for info in local.list()] == []


async def test_the_packer_the_service_calls(blob_store: BlobStore, tmp_path: Path) -> None:
    files = WorkspaceFiles(tmp_path / "root")
    await files.create("w1")
    (files.directory("w1") / "docs").mkdir()
    (files.directory("w1") / "docs/readme.md").write_bytes(b"# w1\n")
    at = datetime.now(UTC)
    archive = Archive(
        id="a1",
        workspace_id="w1",
        organization="organizations/acme",
        format=ArchiveFormat.ZIP,
        path_prefix="docs",
        creator="organizations/acme/users/u1",
        create_time=at,
        expire_time=at + timedelta(hours=1),
        blob_key="archives/w1/a1",
    )
    built = await WorkspaceArchiver(max_bytes=MiB).pack(archive, files, blob_store)
    data = b"".join([block async for block in await blob_store.get("archives/w1/a1")])
    assert (built.size_bytes, built.file_count) == (len(data), 1)
    assert built.sha256 == hashlib.sha256(data).hexdigest()
    with zipfile.ZipFile(io.BytesIO(data)) as archived:
        assert archived.read("docs/readme.md") == b"# w1\n"


# -- a big workspace, in bounded memory ----------------------------------------------------------


def write_random(path: Path, mebibytes: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for _ in range(mebibytes):
            block = os.urandom(MiB)
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class SamplingStore:
    """Samples this process's resident memory at every block a put receives."""

    def __init__(self, store: BlobStore) -> None:
        self._store = store
        self.samples: list[int] = []

    async def put(
        self, key: str, chunks: AsyncIterable[bytes], *, max_bytes: int | None = None
    ) -> BlobInfo:
        async def sampled() -> AsyncIterator[bytes]:
            async for chunk in chunks:
                self.samples.append(rss())
                yield chunk

        return await self._store.put(key, sampled(), max_bytes=max_bytes)


def member_digest(path: Path, name: str, format: ArchiveFormat) -> str:
    digest = hashlib.sha256()
    if format is ArchiveFormat.TAR_GZ:
        with tarfile.open(path, "r:gz") as tar:
            source = tar.extractfile(name)
            assert source is not None
            while block := source.read(MiB):
                digest.update(block)
    else:
        with zipfile.ZipFile(path) as archive, archive.open(name) as source:
            while block := source.read(MiB):
                digest.update(block)
    return digest.hexdigest()


@pytest.mark.parametrize("format", FORMATS, ids=lambda f: f.value)
async def test_a_200_mib_file_in_bounded_memory(
    blob_store: BlobStore, tmp_path: Path, format: ArchiveFormat
) -> None:
    workspace = tmp_path / "ws"
    (workspace / "data/nested").mkdir(parents=True)
    expected = write_random(workspace / "data/nested/big.bin", 200)
    (workspace / "small.txt").write_bytes(b"small")
    sampling = SamplingStore(blob_store)
    await asyncio.sleep(0)
    before = rss()
    built = await build_archive(workspace, format, sampling, "archives/big")  # type: ignore[arg-type]
    growth = max(sampling.samples) - before
    assert growth < 64 * MiB, f"memory grew by {growth / MiB:.1f} MiB while packing"
    assert len(sampling.samples) > 150  # it did stream: block after block
    assert built.file_count == 2 and built.size_bytes > 200 * MiB

    local = await fetch(blob_store, "archives/big", tmp_path / "archive")
    with local.open("rb") as archived:
        assert hashlib.file_digest(archived, "sha256").hexdigest() == built.sha256
    assert member_digest(local, "data/nested/big.bin", format) == expected


# -- through the service: CreateArchive -> READY -> DownloadArchive ------------------------------


@pytest.mark.parametrize("format", FORMATS, ids=lambda f: f.value)
async def test_an_archive_through_the_service(
    blob_store: BlobStore, tmp_path: Path, signing_key: SigningKey, format: ArchiveFormat
) -> None:
    async with running_stack(
        "sqlite", tmp_path, signing_key, blobs=blob_store, packer=WorkspaceArchiver()
    ) as stack:
        workspace = await stack.workspace()
        (tmp_path / "agent").mkdir()
        wanted = make_workspace(tmp_path / "agent")  # as the agent left it, links and all
        (tmp_path / "agent" / "ws").rename(stack.workspace_dir(workspace.name))
        created = await stack.stub.CreateArchive(
            pb.CreateArchiveRequest(
                parent=workspace.name,
                archive=archive_pb2.Archive(format=PROTO_FORMATS[format]),
                request_id=str(uuid.uuid4()),
            ),
            metadata=stack.auth("alice"),
        )
        await stack.settle()  # the build runs in the background
        archive = (
            await stack.stub.GetArchive(
                pb.GetArchiveRequest(name=created.archive.name), metadata=stack.auth("alice")
            )
        ).archive
        assert archive.state == archive_pb2.Archive.STATE_READY, archive.failure_reason
        assert archive.file_count == len(wanted)
        body = b"".join(
            [
                chunk.data
                async for chunk in stack.stub.DownloadArchive(
                    pb.DownloadArchiveRequest(name=archive.name), metadata=stack.auth("alice")
                )
            ]
        )
        assert (len(body), hashlib.sha256(body).hexdigest()) == (archive.size_bytes, archive.sha256)
        local = tmp_path / "downloaded"
        local.write_bytes(body)
        files = {name: data for name, kind, _, data in members(local, format) if kind == "file"}
        assert files == wanted


async def test_an_archive_over_its_limit_fails_with_the_reason(
    blob_store: BlobStore, tmp_path: Path, signing_key: SigningKey
) -> None:
    async with running_stack(
        "sqlite", tmp_path, signing_key, blobs=blob_store, packer=WorkspaceArchiver(max_bytes=MiB)
    ) as stack:
        workspace = await stack.workspace()
        write_random(stack.workspace_dir(workspace.name) / "big.bin", 3)
        created = await stack.stub.CreateArchive(
            pb.CreateArchiveRequest(parent=workspace.name, request_id=str(uuid.uuid4())),
            metadata=stack.auth("alice"),
        )
        await stack.settle()
        archive = (
            await stack.stub.GetArchive(
                pb.GetArchiveRequest(name=created.archive.name), metadata=stack.auth("alice")
            )
        ).archive
        assert archive.state == archive_pb2.Archive.STATE_FAILED
        assert archive.failure_reason == "ARCHIVE_TOO_LARGE"
        assert [info async for info in blob_store.list("archives/")] == []
