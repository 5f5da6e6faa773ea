"""Workspaces through the gRPC API: created and cloned by services, read by whoever the
visibility rule allows, labelled, deleted with their files."""

from __future__ import annotations

import os
import stat
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2

from corral.services.storage.domain import now
from corral.services.storage.tables import workspaces
from corral.storage.v1 import storage_service_pb2 as pb
from corral.storage.v1 import workspace_pb2
from tests.storage.stack import ACME, ALICE, BAD_TIMESTAMPS, BOB, GLOBEX, Stack, violated_fields
from tests.support.grpc_tools import error_reason


async def test_a_service_creates_a_workspace_named_after_its_session(stack: Stack) -> None:
    ws = await stack.workspace("s1", team="red")
    assert (ws.name, ws.session, ws.owner, ws.organization) == (
        "workspaces/s1",
        "sessions/s1",
        ALICE,
        ACME,
    )
    assert dict(ws.labels) == {"team": "red"} and ws.etag
    assert stack.workspace_dir(ws.name).is_dir()
    got = await stack.stub.GetWorkspace(pb.GetWorkspaceRequest(name=ws.name), metadata=stack.auth())
    assert got.workspace == ws
    await stack.settle()
    assert stack.audit.actions() == ["storage.workspaces.create"]


async def test_create_is_idempotent_and_one_per_session(stack: Stack) -> None:
    request = pb.CreateWorkspaceRequest(
        workspace=workspace_pb2.Workspace(organization=ACME, session="sessions/s2", owner=ALICE),
        request_id=str(uuid.uuid4()),
    )
    first_id = request.request_id
    first = await stack.stub.CreateWorkspace(request, metadata=stack.as_service())
    again = await stack.stub.CreateWorkspace(request, metadata=stack.as_service())
    assert again.workspace.name == first.workspace.name
    request.request_id = str(uuid.uuid4())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.stub.CreateWorkspace(request, metadata=stack.as_service())
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(refused.value) == "WORKSPACE_EXISTS"
    reused = pb.CreateWorkspaceRequest(
        workspace=workspace_pb2.Workspace(organization=ACME, session="sessions/s3", owner=ALICE),
        request_id=first_id,
    )
    with pytest.raises(grpc.aio.AioRpcError) as reuse:
        await stack.stub.CreateWorkspace(reused, metadata=stack.as_service())
    assert error_reason(reuse.value) == "REQUEST_ID_REUSED"


async def test_the_owner_must_belong_to_the_organization(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.workspace(owner="organizations/globex/users/eve")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_list_shows_what_the_role_may_read(stack: Stack) -> None:
    mine = await stack.workspace(owner=ALICE)
    theirs = await stack.workspace(owner=BOB)
    await stack.workspace(org="organizations/globex", owner="organizations/globex/users/eve")

    async def names(**kw: object) -> set[str]:
        reply = await stack.stub.ListWorkspaces(
            pb.ListWorkspacesRequest(),
            metadata=stack.auth(**kw),  # type: ignore[arg-type]
        )
        return {w.name for w in reply.workspaces}

    assert await names() == {mine.name}
    assert await names(user="carol", roles=("viewer",)) == {mine.name, theirs.name}
    assert await names(user="root", roles=("admin",)) == {mine.name, theirs.name}
    filtered = await stack.stub.ListWorkspaces(
        pb.ListWorkspacesRequest(filter=f'owner = "{BOB}"'), metadata=stack.auth()
    )
    assert list(filtered.workspaces) == []


async def test_list_pages_through_every_workspace(stack: Stack) -> None:
    made = {(await stack.workspace()).name for _ in range(5)}
    seen: list[str] = []
    token = ""
    while True:
        reply = await stack.stub.ListWorkspaces(
            pb.ListWorkspacesRequest(page_size=2, page_token=token, order_by="create_time"),
            metadata=stack.auth(),
        )
        seen += [w.name for w in reply.workspaces]
        token = reply.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(made) and len(seen) == 5


MiB = 1024 * 1024
GiB = 1024 * MiB


def _write_at(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _read_at(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def _expiry_change(
    name: str, stamp: timestamp_pb2.Timestamp | None, *paths: str, etag: str = ""
) -> pb.UpdateWorkspaceRequest:
    change = workspace_pb2.Workspace(name=name, etag=etag)
    if stamp is not None:
        change.expire_time.CopyFrom(stamp)
    return pb.UpdateWorkspaceRequest(
        workspace=change, update_mask=field_mask_pb2.FieldMask(paths=paths or ["expire_time"])
    )


def _stamp(at: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(at)
    return stamp


async def test_update_changes_labels_and_expiry_with_an_etag(stack: Stack) -> None:
    ws = await stack.workspace()
    change = workspace_pb2.Workspace(name=ws.name, labels={"keep": "yes"}, etag=ws.etag)
    labelled = await stack.stub.UpdateWorkspace(
        pb.UpdateWorkspaceRequest(
            workspace=change, update_mask=field_mask_pb2.FieldMask(paths=["labels"])
        ),
        metadata=stack.auth(),
    )
    assert dict(labelled.workspace.labels) == {"keep": "yes"}
    assert labelled.workspace.etag != ws.etag
    future = timestamp_pb2.Timestamp(seconds=4_000_000_000)
    expiring = await stack.stub.UpdateWorkspace(
        _expiry_change(ws.name, future, etag=labelled.workspace.etag), metadata=stack.as_service()
    )
    assert expiring.workspace.expire_time.seconds == 4_000_000_000
    assert dict(expiring.workspace.labels) == {"keep": "yes"}
    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await stack.stub.UpdateWorkspace(
            pb.UpdateWorkspaceRequest(
                workspace=change, update_mask=field_mask_pb2.FieldMask(paths=["labels"])
            ),
            metadata=stack.auth(),
        )
    assert error_reason(stale.value) == "ETAG_MISMATCH"
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stack.stub.UpdateWorkspace(
            pb.UpdateWorkspaceRequest(
                workspace=workspace_pb2.Workspace(name=ws.name, owner=BOB),
                update_mask=field_mask_pb2.FieldMask(paths=["owner"]),
            ),
            metadata=stack.auth(),
        )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_no_person_can_make_a_sessions_workspace_expire(stack: Stack) -> None:
    """A workspace lives and dies with its session: a user who set its expire_time (or an
    admin) would have the sweeper delete a live session's working directory under it."""
    ws = await stack.workspace()
    soon = _stamp(now() + timedelta(minutes=1))
    for who in (stack.auth(), stack.auth("root", roles=("admin",))):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stack.stub.UpdateWorkspace(_expiry_change(ws.name, soon), metadata=who)
        assert violated_fields(refused.value) == ["workspace.expire_time"]
        with pytest.raises(grpc.aio.AioRpcError) as past:
            await stack.stub.UpdateWorkspace(
                _expiry_change(ws.name, timestamp_pb2.Timestamp(seconds=1)), metadata=who
            )
        assert violated_fields(past.value) == ["workspace.expire_time"]
    # Another organisation's user learns nothing: NOT_FOUND, as for any other change.
    with pytest.raises(grpc.aio.AioRpcError) as stranger:
        await stack.stub.UpdateWorkspace(
            _expiry_change(ws.name, soon), metadata=stack.auth("eve", org=GLOBEX)
        )
    assert error_reason(stranger.value) == "WORKSPACE_NOT_FOUND"
    # "*" that leaves expire_time as it is (unset) is still the owner's to send.
    everything = await stack.stub.UpdateWorkspace(
        pb.UpdateWorkspaceRequest(
            workspace=workspace_pb2.Workspace(name=ws.name, labels={"a": "b"}),
            update_mask=field_mask_pb2.FieldMask(paths=["*"]),
        ),
        metadata=stack.auth(),
    )
    assert dict(everything.workspace.labels) == {"a": "b"}
    assert not everything.workspace.HasField("expire_time")
    done = await stack.service.sweeper.sweep()
    assert done is not None and done.workspaces_deleted == 0
    assert stack.workspace_dir(ws.name).is_dir()


async def test_a_past_or_impossible_expire_time_is_refused_even_to_services(
    stack: Stack,
) -> None:
    ws = await stack.workspace()
    for stamp in (timestamp_pb2.Timestamp(seconds=1), *BAD_TIMESTAMPS):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stack.stub.UpdateWorkspace(
                _expiry_change(ws.name, stamp), metadata=stack.as_service()
            )
        assert violated_fields(refused.value) == ["workspace.expire_time"]
        with pytest.raises(grpc.aio.AioRpcError) as created:
            await stack.stub.CreateWorkspace(
                pb.CreateWorkspaceRequest(
                    workspace=workspace_pb2.Workspace(
                        organization=ACME,
                        session=f"sessions/{uuid.uuid4().hex}",
                        owner=ALICE,
                        expire_time=stamp,
                    ),
                    request_id=str(uuid.uuid4()),
                ),
                metadata=stack.as_service(),
            )
        assert violated_fields(created.value) == ["workspace.expire_time"]
    got = await stack.stub.GetWorkspace(pb.GetWorkspaceRequest(name=ws.name), metadata=stack.auth())
    assert got.workspace == ws
    listed = await stack.stub.ListWorkspaces(pb.ListWorkspacesRequest(), metadata=stack.auth())
    assert [w.name for w in listed.workspaces] == [ws.name]


async def test_delete_removes_the_files_and_gives_the_bytes_back(stack: Stack) -> None:
    ws = await stack.workspace()
    await stack.stub.WriteFile(
        pb.WriteFileRequest(parent=ws.name, path="notes.md", data=b"x" * 1000),
        metadata=stack.auth(),
    )
    assert stack.ledger.in_use(ALICE) == 1000
    await stack.stub.DeleteWorkspace(
        pb.DeleteWorkspaceRequest(name=ws.name), metadata=stack.as_service()
    )
    await stack.settle()
    assert not stack.workspace_dir(ws.name).exists()
    assert stack.ledger.in_use(ALICE) == 0 and stack.ledger.live() == []
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await stack.stub.GetWorkspace(pb.GetWorkspaceRequest(name=ws.name), metadata=stack.auth())
    assert error_reason(gone.value) == "WORKSPACE_NOT_FOUND"
    assert list((stack.root / "trash").iterdir()) == []


async def test_clone_copies_the_files_for_the_forks_owner(stack: Stack) -> None:
    ws = await stack.workspace()
    directory = stack.workspace_dir(ws.name)
    (directory / "src").mkdir()
    (directory / "src" / "main.py").write_bytes(b"print('hi')\n")
    (directory / "data.bin").write_bytes(b"\x00" * 4096)
    (directory / "link").symlink_to("/etc/passwd")
    clone = await stack.stub.CloneWorkspace(
        pb.CloneWorkspaceRequest(
            name=ws.name, session="sessions/fork1", owner=BOB, request_id=str(uuid.uuid4())
        ),
        metadata=stack.as_service(),
    )
    copy = clone.workspace
    assert (copy.name, copy.owner, copy.source_workspace) == ("workspaces/fork1", BOB, ws.name)
    assert (copy.size_bytes, copy.file_count) == (4096 + 12, 2)
    target = stack.workspace_dir(copy.name)
    assert (target / "src" / "main.py").read_bytes() == b"print('hi')\n"
    assert not (target / "link").exists() and not (target / "link").is_symlink()
    (directory / "data.bin").write_bytes(b"changed")
    assert (target / "data.bin").read_bytes() == b"\x00" * 4096
    assert stack.ledger.in_use(BOB) == 4096 + 12


async def test_clone_keeps_holes_and_modes(stack: Stack) -> None:
    """A sparse file stays sparse (a 1 GiB ``truncate -s 1G`` file is not written out as 1 GiB
    of zeros) and every directory keeps its permission bits, the workspace's own included."""
    ws = await stack.workspace()
    directory = stack.workspace_dir(ws.name)
    sparse = directory / "sparse.img"
    sparse.write_bytes(b"")
    os.truncate(sparse, GiB)
    _write_at(sparse, GiB // 2, b"middle")
    data = directory / "data"
    data.mkdir()
    (data / "a.txt").write_bytes(b"a" * 5000)
    (data / "empty").write_bytes(b"")
    locked = directory / "locked"
    locked.mkdir()
    (locked / "inside.txt").write_bytes(b"inside")
    (directory / "tail").write_bytes(b"t" * 100)
    os.truncate(directory / "tail", 10 * MiB)  # data, then a hole to the end
    os.chmod(data, 0o750)
    os.chmod(locked, 0o500)
    os.chmod(directory, 0o700)
    assert os.stat(sparse).st_blocks * 512 < MiB
    clone = await stack.stub.CloneWorkspace(
        pb.CloneWorkspaceRequest(
            name=ws.name, session="sessions/sparse1", owner=BOB, request_id=str(uuid.uuid4())
        ),
        metadata=stack.as_service(),
    )
    target = stack.workspace_dir(clone.workspace.name)
    copied = os.stat(target / "sparse.img")
    assert copied.st_size == GiB
    assert copied.st_blocks * 512 < MiB  # not 1 GiB on disk
    assert _read_at(target / "sparse.img", GiB // 2 - 4, 14) == b"\0" * 4 + b"middle" + b"\0" * 4
    tail = (target / "tail").read_bytes()
    assert len(tail) == 10 * MiB and tail[:100] == b"t" * 100
    assert tail.count(0) == len(tail) - 100
    assert (target / "data" / "a.txt").read_bytes() == b"a" * 5000
    assert (target / "data" / "empty").read_bytes() == b""
    assert (target / "locked" / "inside.txt").read_bytes() == b"inside"
    modes = {p: stat.S_IMODE(os.stat(target / p).st_mode) for p in (".", "data", "locked")}
    assert modes == {".": 0o700, "data": 0o750, "locked": 0o500}
    assert clone.workspace.size_bytes == GiB + 5000 + 6 + 10 * MiB


async def test_clone_is_refused_past_the_new_owners_quota(stack: Stack) -> None:
    ws = await stack.workspace()
    (stack.workspace_dir(ws.name) / "big").write_bytes(b"b" * 10_000)
    stack.ledger.limits[BOB] = 5_000
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.stub.CloneWorkspace(
            pb.CloneWorkspaceRequest(name=ws.name, session="sessions/fork2", owner=BOB),
            metadata=stack.as_service(),
        )
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(refused.value) == "STORAGE_QUOTA_EXCEEDED"
    assert not stack.workspace_dir("workspaces/fork2").exists()
    assert stack.ledger.in_use(BOB) == 0


async def test_expire_time_is_a_timestamp_the_sweeper_honours(stack: Stack) -> None:
    ws = await stack.workspace()
    soon = _stamp(now() + timedelta(minutes=1))
    await stack.stub.UpdateWorkspace(_expiry_change(ws.name, soon), metadata=stack.as_service())
    async with stack.engine.begin() as connection:  # a minute on
        await connection.execute(
            workspaces.update().values(expire_time=now() - timedelta(seconds=1))
        )
    done = await stack.service.sweeper.sweep()
    assert done is not None and done.workspaces_deleted == 1
    assert not stack.workspace_dir(ws.name).exists()
