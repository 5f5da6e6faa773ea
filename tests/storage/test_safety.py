"""Every path traversal and symlink escape we could think of, refused.

Traversal (the path rules, INVALID_ARGUMENT: INVALID_PATH unless the kit's NUL check answers
first), each tried as WriteFile's path, CreateUpload's path, MoveFile's destination,
ListFiles' prefix and CreateArchive's path_prefix:
  ``..``, ``.``, ``../escape``, ``a/../../escape``, ``a/..``, ``./a``, ``a/.``, ``/etc/passwd``,
  ``//etc``, ``a//b``, ``a/`` (for files), an empty path, a backslash (``..\\escape``,
  ``a\\..\\b``), NUL, a newline, DEL, a C1 control (NEL), an NFD path (``e`` + combining
  acute), Unicode format characters (RLO, zero-width space, BOM) and line/paragraph separators,
  1,025 bytes, a 256-byte segment.
File names: a padded or non-canonical base64 ``{file}``, the base64 of ``../x``, of an absolute
path and of invalid UTF-8, a ``{file}`` with ``/`` or ``.``, and a workspace id of ``..``.
Symlinks an agent planted (never followed, wherever they point):
  a link to a file outside (get, download, delete, list, move: FILE_NOT_FOUND / not listed; a
  write with overwrite replaces the link itself, the target is untouched), a link to a directory
  outside (reads under it FILE_NOT_FOUND, writes and uploads under it PATH_CONFLICT, a move into
  it PATH_CONFLICT, listing under it empty), a link to a directory inside the workspace (the
  same: links are not followed even when harmless), a dangling link, and a FIFO (a read does not
  hang: FILE_NOT_FOUND).
"""

from __future__ import annotations

import base64
import os
import uuid
from pathlib import Path

import grpc
import pytest

from corral.services.storage.paths import file_id
from corral.storage.v1 import archive_pb2, upload_pb2
from corral.storage.v1 import storage_service_pb2 as pb
from tests.storage.stack import Stack, sha
from tests.support.grpc_tools import error_reason

BAD_PATHS = [
    "..",
    ".",
    "../escape",
    "a/../../escape",
    "a/..",
    "./a",
    "a/.",
    "/etc/passwd",
    "//etc",
    "a//b",
    "",
    "..\\escape",
    "a\\..\\b",
    "a\x00b",
    "a\nb",
    "a\x7fb",
    "a\x85b",
    "e\u0301.txt",
    "invoice\u202efdp.exe",  # RIGHT-TO-LEFT OVERRIDE: shows as "invoiceexe.pdf"
    "a\u200bb",  # ZERO WIDTH SPACE: looks like "ab"
    "\ufeffa.txt",  # a byte order mark
    "a\u2028b",  # LINE SEPARATOR
    "a\u2029b",  # PARAGRAPH SEPARATOR
    "x" * 1025,
    "d/" + "s" * 256,
]
FILE_PATH_ONLY = ["a/"]  # a directory prefix is fine in a listing, not as a file


async def _refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call  # type: ignore[misc]
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    return refused.value


@pytest.mark.parametrize("path", BAD_PATHS + FILE_PATH_ONLY)
async def test_bad_paths_are_refused_everywhere(stack: Stack, path: str) -> None:
    ws = await stack.workspace()
    good = await stack.stub.WriteFile(
        pb.WriteFileRequest(parent=ws.name, path="ok.txt", data=b"ok"), metadata=stack.auth()
    )
    calls = [
        stack.stub.WriteFile(
            pb.WriteFileRequest(parent=ws.name, path=path, data=b"x"), metadata=stack.auth()
        ),
        stack.stub.CreateUpload(
            pb.CreateUploadRequest(parent=ws.name, upload=upload_pb2.Upload(path=path)),
            metadata=stack.auth(),
        ),
        stack.stub.MoveFile(
            pb.MoveFileRequest(name=good.file.name, destination_path=path), metadata=stack.auth()
        ),
    ]
    if path not in FILE_PATH_ONLY and path:
        calls.append(
            stack.stub.ListFiles(
                pb.ListFilesRequest(parent=ws.name, prefix=path), metadata=stack.auth()
            )
        )
        calls.append(
            stack.stub.CreateArchive(
                pb.CreateArchiveRequest(
                    parent=ws.name, archive=archive_pb2.Archive(path_prefix=path)
                ),
                metadata=stack.auth(),
            )
        )
    for call in calls:
        refused = await _refused(call)
        if "\x00" not in path:  # the kit refuses NUL in any field before a handler runs
            assert error_reason(refused) == "INVALID_PATH"
    outside = stack.root.parent
    assert not (outside / "escape").exists() and not (stack.root / "escape").exists()
    assert sorted(p.name for p in stack.workspace_dir(ws.name).iterdir()) == ["ok.txt"]


@pytest.mark.parametrize(
    "encoded",
    [
        file_id("ok.txt") + "=",  # padded: one path has one name
        base64.urlsafe_b64encode(b"../x").decode().rstrip("="),
        base64.urlsafe_b64encode(b"/etc/passwd").decode().rstrip("="),
        base64.urlsafe_b64encode(b"\xff\xfe").decode().rstrip("="),
        "b2s/dHh0",
        "..",
        "",
    ],
)
async def test_bad_file_names_are_refused(stack: Stack, encoded: str) -> None:
    ws = await stack.workspace()
    for name in (f"{ws.name}/files/{encoded}", f"workspaces/../files/{file_id('ok.txt')}"):
        await _refused(stack.stub.GetFile(pb.GetFileRequest(name=name), metadata=stack.auth()))


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    place = tmp_path / "outside"
    place.mkdir()
    (place / "secret").write_bytes(b"not the agent's")
    return place


async def test_links_to_files_are_never_followed(stack: Stack, outside: Path) -> None:
    ws = await stack.workspace()
    directory = stack.workspace_dir(ws.name)
    (directory / "leak").symlink_to(outside / "secret")
    (directory / "dangling").symlink_to(outside / "nothing")
    (directory / "real").write_bytes(b"mine")
    (directory / "inner").symlink_to(directory / "real")
    os.mkfifo(directory / "pipe")
    listed = await stack.stub.ListFiles(pb.ListFilesRequest(parent=ws.name), metadata=stack.auth())
    assert [f.path for f in listed.files] == ["real"]
    for path in ("leak", "dangling", "inner", "pipe"):
        name = f"{ws.name}/files/{file_id(path)}"
        for call in (
            stack.stub.GetFile(pb.GetFileRequest(name=name), metadata=stack.auth()),
            _drain(
                stack.stub.DownloadFile(pb.DownloadFileRequest(name=name), metadata=stack.auth())
            ),
            stack.stub.DeleteFile(pb.DeleteFileRequest(name=name), metadata=stack.auth()),
            stack.stub.MoveFile(
                pb.MoveFileRequest(name=name, destination_path="moved"), metadata=stack.auth()
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert error_reason(refused.value) == "FILE_NOT_FOUND", path
    # overwriting a link replaces the link, never what it points at
    await stack.stub.WriteFile(
        pb.WriteFileRequest(parent=ws.name, path="leak", data=b"new", overwrite=True),
        metadata=stack.auth(),
    )
    assert (outside / "secret").read_bytes() == b"not the agent's"
    assert not (directory / "leak").is_symlink() and (directory / "leak").read_bytes() == b"new"
    assert (directory / "dangling").is_symlink() and (directory / "real").read_bytes() == b"mine"


async def _drain(call: object) -> None:
    async for _ in call:  # type: ignore[attr-defined]
        pass


@pytest.mark.parametrize("inside", [False, True])
async def test_links_to_directories_are_never_followed(
    stack: Stack, outside: Path, inside: bool
) -> None:
    ws = await stack.workspace()
    directory = stack.workspace_dir(ws.name)
    target = outside
    if inside:
        target = directory / "real-dir"
        target.mkdir()
        (target / "secret").write_bytes(b"not the agent's")
    (directory / "door").symlink_to(target, target_is_directory=True)
    before = sorted(p.name for p in target.iterdir())
    through = f"{ws.name}/files/{file_id('door/secret')}"
    with pytest.raises(grpc.aio.AioRpcError) as read:
        await stack.stub.GetFile(pb.GetFileRequest(name=through), metadata=stack.auth())
    assert error_reason(read.value) == "FILE_NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as dl:
        await _drain(
            stack.stub.DownloadFile(pb.DownloadFileRequest(name=through), metadata=stack.auth())
        )
    assert error_reason(dl.value) == "FILE_NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as delete:
        await stack.stub.DeleteFile(pb.DeleteFileRequest(name=through), metadata=stack.auth())
    assert error_reason(delete.value) == "FILE_NOT_FOUND"
    for path in ("door/planted", "door/sub/planted"):
        with pytest.raises(grpc.aio.AioRpcError) as written:
            await stack.stub.WriteFile(
                pb.WriteFileRequest(parent=ws.name, path=path, data=b"x", overwrite=True),
                metadata=stack.auth(),
            )
        assert error_reason(written.value) == "PATH_CONFLICT"
    ok = await stack.stub.WriteFile(
        pb.WriteFileRequest(parent=ws.name, path="ok", data=b"ok"), metadata=stack.auth()
    )
    with pytest.raises(grpc.aio.AioRpcError) as moved:
        await stack.stub.MoveFile(
            pb.MoveFileRequest(name=ok.file.name, destination_path="door/moved"),
            metadata=stack.auth(),
        )
    assert error_reason(moved.value) == "PATH_CONFLICT"
    listed = await stack.stub.ListFiles(
        pb.ListFilesRequest(parent=ws.name, prefix="door/"), metadata=stack.auth()
    )
    assert list(listed.files) == []
    # a resumable upload into the linked directory: refused at commit, nothing written there
    upload = await stack.stub.CreateUpload(
        pb.CreateUploadRequest(
            parent=ws.name,
            upload=upload_pb2.Upload(path="door/up.bin"),
            request_id=str(uuid.uuid4()),
        ),
        metadata=stack.auth(),
    )
    await stack.stub.AppendUploadChunk(
        pb.AppendUploadChunkRequest(name=upload.upload.name, offset=0, data=b"payload"),
        metadata=stack.auth(),
    )
    with pytest.raises(grpc.aio.AioRpcError) as committed:
        await stack.stub.CommitUpload(
            pb.CommitUploadRequest(name=upload.upload.name, sha256=sha(b"payload")),
            metadata=stack.auth(),
        )
    assert error_reason(committed.value) == "PATH_CONFLICT"
    assert sorted(p.name for p in target.iterdir()) == before
    assert (target / "secret").read_bytes() == b"not the agent's"
