"""The attacker's view of every StorageService RPC: no token, another organisation, another
user of the same organisation, a viewer, and users (admins and superusers too) calling the
internal methods."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from corral.services.storage.domain import Archive, ArchiveFormat, ArchiveState, now
from corral.storage.v1 import archive_pb2, report_pb2, upload_pb2, workspace_pb2
from corral.storage.v1 import storage_service_pb2 as pb
from corral.storage.v1 import storage_service_pb2_grpc as rpc
from tests.storage.stack import ACME, ALICE, Stack, sha
from tests.support.grpc_tools import error_reason

Metadata = tuple[tuple[str, str], ...]


@dataclass
class Target:
    workspace: str
    file: str
    upload: str
    report: str
    archive: str


async def _drain(call: Any) -> None:
    async for _ in call:
        pass


def calls(
    stub: rpc.StorageServiceStub, t: Target
) -> dict[str, Callable[[Metadata], Awaitable[Any]]]:
    """One call of every RPC on alice's resources, by the method's name."""
    ws = t.workspace
    return {
        "GetWorkspace": lambda m: stub.GetWorkspace(pb.GetWorkspaceRequest(name=ws), metadata=m),
        "UpdateWorkspace": lambda m: stub.UpdateWorkspace(
            pb.UpdateWorkspaceRequest(
                workspace=workspace_pb2.Workspace(name=ws, labels={"x": "y"}),
                update_mask=field_mask_pb2.FieldMask(paths=["labels"]),
            ),
            metadata=m,
        ),
        "DeleteWorkspace": lambda m: stub.DeleteWorkspace(
            pb.DeleteWorkspaceRequest(name=ws), metadata=m
        ),
        "GetFile": lambda m: stub.GetFile(pb.GetFileRequest(name=t.file), metadata=m),
        "ListFiles": lambda m: stub.ListFiles(pb.ListFilesRequest(parent=ws), metadata=m),
        "WriteFile": lambda m: stub.WriteFile(
            pb.WriteFileRequest(parent=ws, path="evil.txt", data=b"x"), metadata=m
        ),
        "DeleteFile": lambda m: stub.DeleteFile(pb.DeleteFileRequest(name=t.file), metadata=m),
        "MoveFile": lambda m: stub.MoveFile(
            pb.MoveFileRequest(name=t.file, destination_path="moved"), metadata=m
        ),
        "DownloadFile": lambda m: _drain(
            stub.DownloadFile(pb.DownloadFileRequest(name=t.file), metadata=m)
        ),
        "DownloadFileContent": lambda m: _drain(
            stub.DownloadFileContent(pb.DownloadFileContentRequest(name=t.file), metadata=m)
        ),
        "CreateUpload": lambda m: stub.CreateUpload(
            pb.CreateUploadRequest(parent=ws, upload=upload_pb2.Upload(path="up")), metadata=m
        ),
        "GetUpload": lambda m: stub.GetUpload(pb.GetUploadRequest(name=t.upload), metadata=m),
        "AppendUploadChunk": lambda m: stub.AppendUploadChunk(
            pb.AppendUploadChunkRequest(name=t.upload, offset=0, data=b"x"), metadata=m
        ),
        "CommitUpload": lambda m: stub.CommitUpload(
            pb.CommitUploadRequest(name=t.upload, sha256=sha(b"")), metadata=m
        ),
        "AbortUpload": lambda m: stub.AbortUpload(pb.AbortUploadRequest(name=t.upload), metadata=m),
        "CreateReport": lambda m: stub.CreateReport(  # filed on alice's quota
            pb.CreateReportRequest(
                report=report_pb2.Report(
                    title="t", format=report_pb2.REPORT_FORMAT_MARKDOWN, content=b"x", owner=ALICE
                )
            ),
            metadata=m,
        ),
        "GetReport": lambda m: stub.GetReport(pb.GetReportRequest(name=t.report), metadata=m),
        "DeleteReport": lambda m: stub.DeleteReport(
            pb.DeleteReportRequest(name=t.report), metadata=m
        ),
        "DownloadReport": lambda m: _drain(
            stub.DownloadReport(pb.DownloadReportRequest(name=t.report), metadata=m)
        ),
        "CreateArchive": lambda m: stub.CreateArchive(
            pb.CreateArchiveRequest(parent=ws, archive=archive_pb2.Archive()), metadata=m
        ),
        "GetArchive": lambda m: stub.GetArchive(pb.GetArchiveRequest(name=t.archive), metadata=m),
        "ListArchives": lambda m: stub.ListArchives(pb.ListArchivesRequest(parent=ws), metadata=m),
        "DeleteArchive": lambda m: stub.DeleteArchive(
            pb.DeleteArchiveRequest(name=t.archive), metadata=m
        ),
        "DownloadArchive": lambda m: _drain(
            stub.DownloadArchive(pb.DownloadArchiveRequest(name=t.archive), metadata=m)
        ),
        "GetStorageUsage": lambda m: stub.GetStorageUsage(
            pb.GetStorageUsageRequest(name=f"{ACME}/storageUsage"), metadata=m
        ),
        "CreateWorkspace": lambda m: stub.CreateWorkspace(
            pb.CreateWorkspaceRequest(
                workspace=workspace_pb2.Workspace(
                    organization=ACME, session=f"sessions/{uuid.uuid4().hex}", owner=ALICE
                )
            ),
            metadata=m,
        ),
        "CloneWorkspace": lambda m: stub.CloneWorkspace(
            pb.CloneWorkspaceRequest(name=ws, session="sessions/stolen", owner=ALICE), metadata=m
        ),
    }


LISTS = {"ListWorkspaces", "ListReports"}
READS = {
    "GetWorkspace", "GetFile", "ListFiles", "DownloadFile", "DownloadFileContent", "GetReport",
    "DownloadReport", "GetArchive", "ListArchives", "DownloadArchive", "GetStorageUsage",
}  # fmt: skip
INTERNAL = {"CreateWorkspace", "CloneWorkspace"}
UPLOADS = {"GetUpload", "AppendUploadChunk", "CommitUpload", "AbortUpload"}


async def target(stack: Stack) -> Target:
    ws = await stack.workspace()
    written = await stack.stub.WriteFile(
        pb.WriteFileRequest(parent=ws.name, path="secret.txt", data=b"alice's"),
        metadata=stack.auth(),
    )
    upload = await stack.stub.CreateUpload(
        pb.CreateUploadRequest(parent=ws.name, upload=upload_pb2.Upload(path="up.bin")),
        metadata=stack.auth(),
    )
    report = await stack.stub.CreateReport(
        pb.CreateReportRequest(
            report=report_pb2.Report(
                title="mine", format=report_pb2.REPORT_FORMAT_MARKDOWN, content=b"private"
            )
        ),
        metadata=stack.auth(),
    )
    return Target(
        ws.name, written.file.name, upload.upload.name, report.report.name, await archive(stack, ws)
    )


async def archive(stack: Stack, ws: workspace_pb2.Workspace) -> str:
    """A READY archive of ``ws`` (this stack has no packer: made at the repository)."""
    workspace_id = ws.name.removeprefix("workspaces/")
    made = Archive(
        id=uuid.uuid4().hex,
        workspace_id=workspace_id,
        organization=ws.organization,
        format=ArchiveFormat.TAR_GZ,
        path_prefix="",
        creator=ALICE,
        create_time=now(),
        expire_time=now() + timedelta(days=1),
        blob_key=f"archives/{workspace_id}/packed",
        state=ArchiveState.READY,
    )

    async def content() -> AsyncIterator[bytes]:
        yield b"packed"

    stored = await stack.blobs.put(made.blob_key, content())
    made.size_bytes, made.sha256 = stored.size, stored.sha256 or ""
    async with stack.service.storage.uow() as uow:
        await uow.archives.add(made)
        await uow.commit()
    return made.name


def test_every_rpc_is_in_the_matrix() -> None:
    methods = set(pb.DESCRIPTOR.services_by_name["StorageService"].methods_by_name)
    assert set(calls(None, Target("", "", "", "", ""))) | LISTS == methods  # type: ignore[arg-type]


async def _status(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), error_reason(exc)
    return grpc.StatusCode.OK, ""


async def test_no_token_is_unauthenticated_everywhere(stack: Stack) -> None:
    t = await target(stack)
    for method, call in calls(stack.stub, t).items():
        assert (await _status(call(())))[0] == grpc.StatusCode.UNAUTHENTICATED, method
    for lister in (
        stack.stub.ListWorkspaces(pb.ListWorkspacesRequest()),
        stack.stub.ListReports(pb.ListReportsRequest()),
    ):
        assert (await _status(lister))[0] == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("who", "roles"),
    [
        ("mallory@globex", ("admin",)),  # another organisation's admin
        ("bob", ("user",)),  # another user of alice's organisation
    ],
)
async def test_outsiders_learn_nothing(stack: Stack, who: str, roles: tuple[str, ...]) -> None:
    t = await target(stack)
    user, _, org = who.partition("@")
    metadata = stack.auth(user, org=f"organizations/{org}" if org else ACME, roles=roles)
    for method, call in calls(stack.stub, t).items():
        code, reason = await _status(call(metadata))
        if method in INTERNAL:
            assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "SERVICE_ONLY"), method
        elif method == "GetStorageUsage":
            if org:  # another organisation's figures: not found
                assert code == grpc.StatusCode.NOT_FOUND, method
        elif method == "CreateReport":  # only services file for someone else
            assert code == grpc.StatusCode.INVALID_ARGUMENT, method
        else:
            assert code == grpc.StatusCode.NOT_FOUND, (method, code, reason)
    for lister in (
        stack.stub.ListWorkspaces(pb.ListWorkspacesRequest(), metadata=metadata),
        stack.stub.ListReports(pb.ListReportsRequest(), metadata=metadata),
    ):
        reply = await lister
        assert list(getattr(reply, "workspaces", getattr(reply, "reports", None))) == []
    bypass = await stack.stub.ListWorkspaces(
        pb.ListWorkspacesRequest(filter=f'organization = "{ACME}"'), metadata=metadata
    )
    assert list(bypass.workspaces) == []
    assert (stack.workspace_dir(t.workspace) / "secret.txt").read_bytes() == b"alice's"
    assert not (stack.workspace_dir(t.workspace) / "evil.txt").exists()


async def test_a_viewer_reads_but_changes_nothing(stack: Stack) -> None:
    t = await target(stack)
    viewer = stack.auth("vera", roles=("viewer",))
    for method, call in calls(stack.stub, t).items():
        code, reason = await _status(call(viewer))
        if method in INTERNAL:
            assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "SERVICE_ONLY")
        elif method in READS:
            assert code == grpc.StatusCode.OK, (method, code, reason)
        elif method in UPLOADS:  # an upload is seen by its creator and the workspace's writers
            assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "UPLOAD_NOT_FOUND"), method
        else:
            assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "READ_ONLY_ACCESS"), (
                method,
                code,
                reason,
            )
    assert (stack.workspace_dir(t.workspace) / "secret.txt").exists()


@pytest.mark.parametrize("roles", [("user",), ("admin",), ("superuser",)])
async def test_people_never_reach_the_internal_methods(
    stack: Stack, roles: tuple[str, ...]
) -> None:
    t = await target(stack)
    internal = {k: v for k, v in calls(stack.stub, t).items() if k in INTERNAL}
    for method, call in internal.items():
        code, reason = await _status(call(stack.auth(roles=roles)))
        assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "SERVICE_ONLY"), method
    assert not stack.workspace_dir("workspaces/stolen").exists()


async def test_an_admin_of_the_organization_may_drive_but_not_append(stack: Stack) -> None:
    t = await target(stack)
    admin = stack.auth("root", roles=("admin",))
    assert (
        await _status(stack.stub.GetUpload(pb.GetUploadRequest(name=t.upload), metadata=admin))
    )[0] == grpc.StatusCode.OK
    code, reason = await _status(
        stack.stub.AppendUploadChunk(
            pb.AppendUploadChunkRequest(name=t.upload, offset=0, data=b"x"), metadata=admin
        )
    )
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "READ_ONLY_ACCESS")
    aborted = await stack.stub.AbortUpload(pb.AbortUploadRequest(name=t.upload), metadata=admin)
    assert aborted.upload.state == upload_pb2.Upload.STATE_ABORTED
    await stack.stub.DeleteWorkspace(pb.DeleteWorkspaceRequest(name=t.workspace), metadata=admin)
    code, _ = await _status(
        stack.stub.DeleteWorkspace(
            pb.DeleteWorkspaceRequest(name=t.workspace), metadata=stack.auth()
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND


async def test_a_user_may_not_delete_their_sessions_workspace(stack: Stack) -> None:
    t = await target(stack)
    code, reason = await _status(
        stack.stub.DeleteWorkspace(
            pb.DeleteWorkspaceRequest(name=t.workspace), metadata=stack.auth()
        )
    )
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "READ_ONLY_ACCESS")
