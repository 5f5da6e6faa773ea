"""The StorageService servicer: proto <-> Python and the shape of requests; the rules live in
the service layer (who may do what: ``domain.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from google.api import httpbody_pb2

from corral.libs.audit import CallOrigins
from corral.libs.auth.caller import require_caller
from corral.libs.errors import FieldViolation, InvalidArgument, Validator
from corral.libs.listing import fingerprint, list_query, page_from
from corral.libs.names import ids_of
from corral.libs.ratelimit import Networks
from corral.libs.timestamps import from_timestamp, to_timestamp
from corral.libs.validation import (
    check_labels,
    check_request_id,
    check_text,
    check_update_mask,
)
from corral.services.storage import converters as cv
from corral.services.storage.domain import (
    ARCHIVE,
    CONTENT_TYPES,
    MAX_ARCHIVE_LIFETIME,
    MAX_CHUNK_BYTES,
    MAX_REPORT_BYTES,
    MAX_WRITE_BYTES,
    ORGANIZATION,
    REPORT,
    SESSION,
    TASK_RUN,
    UPLOAD,
    USAGE,
    WORKSPACE,
    ArchiveFormat,
    ReportFormat,
    is_service,
    now,
)
from corral.services.storage.files import Download
from corral.services.storage.paths import (
    DELIMITER,
    check_path,
    check_prefix,
    parse_file_name,
)
from corral.services.storage.service import StorageService
from corral.storage.v1 import archive_pb2, report_pb2, storage_usage_pb2
from corral.storage.v1 import storage_service_pb2 as pb
from corral.storage.v1 import storage_service_pb2_grpc as rpc

MAX_TITLE = 500
MAX_CONTENT_TYPE = 200
UPDATABLE = frozenset({"labels", "expire_time"})


def _content_type(value: str, field: str, check: Validator) -> None:
    check_text(value, check, field, max_length=MAX_CONTENT_TYPE, lines=False)


class StorageApi(rpc.StorageServiceServicer):
    def __init__(self, service: StorageService, trusted_proxies: Networks | None = None) -> None:
        """``trusted_proxies``: who may name the client's address (the edge); the deployment's
        CORRAL_TRUSTED_PROXIES if not given."""
        self._service = service
        self._origin = CallOrigins(trusted_proxies).capture  # for a change's audit event

    async def _download(
        self, request: pb.DownloadFileRequest | pb.DownloadFileContentRequest
    ) -> Download:
        workspace_id, path = parse_file_name(request.name, "name")
        check = Validator()
        check.check(request.offset >= 0, "offset", "must not be negative")
        check.check(request.limit >= 0, "limit", "must not be negative")
        check.raise_if_any()
        return await self._service.files.download(
            require_caller(),
            workspace_id,
            path,
            offset=request.offset,
            limit=request.limit,
            if_sha256=request.if_sha256.lower(),
        )

    # -- workspaces ------------------------------------------------------------------------------

    async def GetWorkspace(
        self, request: pb.GetWorkspaceRequest, context: Any
    ) -> pb.GetWorkspaceResponse:
        (workspace_id,) = WORKSPACE.parse_field(request.name, "name")
        found = await self._service.workspaces.get(require_caller(), workspace_id)
        return pb.GetWorkspaceResponse(workspace=cv.workspace_to_proto(found))

    async def ListWorkspaces(
        self, request: pb.ListWorkspacesRequest, context: Any
    ) -> pb.ListWorkspacesResponse:
        caller = require_caller()
        query = list_query(request, cv.WORKSPACE_FIELDS, cv.WORKSPACE_ORDER, caller.subject)
        found, token = await self._service.workspaces.list(caller, query)
        return pb.ListWorkspacesResponse(
            workspaces=[cv.workspace_to_proto(w) for w in found], next_page_token=token
        )

    async def CreateWorkspace(
        self, request: pb.CreateWorkspaceRequest, context: Any
    ) -> pb.CreateWorkspaceResponse:
        self._origin(context)
        caller = require_caller()
        check = Validator()
        sent = request.workspace
        ids_of(ORGANIZATION, sent.organization, "workspace.organization", check)
        (session_id,) = ids_of(SESSION, sent.session, "workspace.session", check)
        check.require(sent.owner, "workspace.owner")
        check_labels(sent.labels, check, "workspace.labels")
        check_request_id(request.request_id, check)
        if not is_service(caller):  # the internal method's refusal comes before its checks
            check = Validator()
        check.raise_if_any()
        expire_time = _future(sent, "workspace.expire_time") if is_service(caller) else None
        created = await self._service.workspaces.create(
            caller,
            organization=sent.organization,
            session_id=session_id,
            owner=sent.owner,
            labels=dict(sent.labels),
            expire_time=expire_time,
            request_id=request.request_id,
        )
        return pb.CreateWorkspaceResponse(workspace=cv.workspace_to_proto(created))

    async def CloneWorkspace(
        self, request: pb.CloneWorkspaceRequest, context: Any
    ) -> pb.CloneWorkspaceResponse:
        self._origin(context)
        caller = require_caller()
        check = Validator()
        (source_id,) = ids_of(WORKSPACE, request.name, "name", check)
        (session_id,) = ids_of(SESSION, request.session, "session", check)
        check.require(request.owner, "owner")
        check_labels(request.labels, check, "labels")
        check_request_id(request.request_id, check)
        if not is_service(caller):
            check = Validator()
        check.raise_if_any()
        created = await self._service.workspaces.clone(
            caller,
            source_id,
            session_id=session_id,
            owner=request.owner,
            labels=dict(request.labels) if request.labels else None,
            request_id=request.request_id,
        )
        return pb.CloneWorkspaceResponse(workspace=cv.workspace_to_proto(created))

    async def UpdateWorkspace(
        self, request: pb.UpdateWorkspaceRequest, context: Any
    ) -> pb.UpdateWorkspaceResponse:
        self._origin(context)
        check = Validator()
        sent = request.workspace
        (workspace_id,) = ids_of(WORKSPACE, sent.name, "workspace.name", check)
        paths = check_update_mask(request.update_mask, UPDATABLE, check)
        if "labels" in paths:
            check_labels(sent.labels, check, "workspace.labels")
        check.raise_if_any()
        expire_time = _future(sent, "workspace.expire_time") if "expire_time" in paths else None
        updated = await self._service.workspaces.update(
            require_caller(),
            workspace_id,
            etag=sent.etag,
            paths=paths,
            labels=dict(sent.labels),
            expire_time=expire_time,
        )
        return pb.UpdateWorkspaceResponse(workspace=cv.workspace_to_proto(updated))

    async def DeleteWorkspace(
        self, request: pb.DeleteWorkspaceRequest, context: Any
    ) -> pb.DeleteWorkspaceResponse:
        self._origin(context)
        (workspace_id,) = WORKSPACE.parse_field(request.name, "name")
        await self._service.workspaces.delete(require_caller(), workspace_id, etag=request.etag)
        return pb.DeleteWorkspaceResponse()

    # -- files -----------------------------------------------------------------------------------

    async def GetFile(self, request: pb.GetFileRequest, context: Any) -> pb.GetFileResponse:
        workspace_id, path = parse_file_name(request.name, "name")
        found = await self._service.files.get(require_caller(), workspace_id, path)
        return pb.GetFileResponse(file=cv.file_to_proto(found))

    async def ListFiles(self, request: pb.ListFilesRequest, context: Any) -> pb.ListFilesResponse:
        check = Validator()
        (workspace_id,) = ids_of(WORKSPACE, request.parent, "parent", check)
        check.check(request.delimiter in ("", DELIMITER), "delimiter", "must be empty or '/'")
        check.raise_if_any()
        prefix = check_prefix(request.prefix, "prefix")
        page = page_from(
            request.page_size,
            request.page_token,
            fingerprint(request.parent, request.prefix, request.delimiter),
            default=100,
        )
        files, prefixes, token = await self._service.files.list(
            require_caller(), workspace_id, prefix=prefix, delimiter=request.delimiter, page=page
        )
        return pb.ListFilesResponse(
            files=[cv.file_to_proto(f) for f in files], prefixes=prefixes, next_page_token=token
        )

    async def WriteFile(self, request: pb.WriteFileRequest, context: Any) -> pb.WriteFileResponse:
        self._origin(context)
        check = Validator()
        (workspace_id,) = ids_of(WORKSPACE, request.parent, "parent", check)
        _content_type(request.content_type, "content_type", check)
        check.check(not request.if_sha256 or request.overwrite, "if_sha256", "needs overwrite")
        check.raise_if_any()
        path = check_path(request.path, "path")
        if len(request.data) > MAX_WRITE_BYTES:
            raise InvalidArgument(
                "data is larger than 4 MiB: use an upload",
                reason="CHUNK_TOO_LARGE",
                violations=[_violation("data", "at most 4 MiB")],
            )
        written = await self._service.files.write(
            require_caller(),
            workspace_id,
            path,
            request.data,
            content_type=request.content_type,
            overwrite=request.overwrite,
            if_sha256=request.if_sha256.lower(),
        )
        return pb.WriteFileResponse(file=cv.file_to_proto(written))

    async def DeleteFile(
        self, request: pb.DeleteFileRequest, context: Any
    ) -> pb.DeleteFileResponse:
        self._origin(context)
        workspace_id, path = parse_file_name(request.name, "name")
        await self._service.files.delete(
            require_caller(), workspace_id, path, if_sha256=request.if_sha256.lower()
        )
        return pb.DeleteFileResponse()

    async def MoveFile(self, request: pb.MoveFileRequest, context: Any) -> pb.MoveFileResponse:
        self._origin(context)
        workspace_id, path = parse_file_name(request.name, "name")
        target = check_path(request.destination_path, "destination_path")
        moved = await self._service.files.move(
            require_caller(), workspace_id, path, target, overwrite=request.overwrite
        )
        return pb.MoveFileResponse(file=cv.file_to_proto(moved))

    async def DownloadFile(
        self, request: pb.DownloadFileRequest, context: Any
    ) -> AsyncIterator[pb.DownloadFileResponse]:
        download = await self._download(request)
        first: pb.DownloadFileResponse | None = pb.DownloadFileResponse(
            file=cv.file_to_proto(download.file), offset=request.offset
        )
        position = request.offset
        async for block in download.chunks:
            if first is not None:
                first.data = block
                yield first
                first = None
            else:
                yield pb.DownloadFileResponse(offset=position, data=block)
            position += len(block)
        if first is not None:  # an empty range: the metadata alone
            yield first

    async def DownloadFileContent(
        self, request: pb.DownloadFileContentRequest, context: Any
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        download = await self._download(request)
        async for body in _bodies(download.file.content_type, download.chunks):
            yield body

    # -- uploads ---------------------------------------------------------------------------------

    async def CreateUpload(
        self, request: pb.CreateUploadRequest, context: Any
    ) -> pb.CreateUploadResponse:
        self._origin(context)
        check = Validator()
        (workspace_id,) = ids_of(WORKSPACE, request.parent, "parent", check)
        sent = request.upload
        check.check(sent.size_bytes >= 0, "upload.size_bytes", "must not be negative")
        _content_type(sent.content_type, "upload.content_type", check)
        check_request_id(request.request_id, check)
        check.raise_if_any()
        path = check_path(sent.path, "upload.path")
        created = await self._service.uploads.create(
            require_caller(),
            workspace_id,
            path=path,
            size=sent.size_bytes,
            content_type=sent.content_type,
            overwrite=sent.overwrite,
            request_id=request.request_id,
        )
        return pb.CreateUploadResponse(upload=cv.upload_to_proto(created))

    async def GetUpload(self, request: pb.GetUploadRequest, context: Any) -> pb.GetUploadResponse:
        workspace_id, upload_id = UPLOAD.parse_field(request.name, "name")
        found = await self._service.uploads.get(require_caller(), workspace_id, upload_id)
        return pb.GetUploadResponse(upload=cv.upload_to_proto(found))

    async def AppendUploadChunk(
        self, request: pb.AppendUploadChunkRequest, context: Any
    ) -> pb.AppendUploadChunkResponse:
        check = Validator()
        workspace_id, upload_id = ids_of(UPLOAD, request.name, "name", check)
        check.check(request.offset >= 0, "offset", "must not be negative")
        check.check(bool(request.data), "data", "is required")
        check.raise_if_any()
        if len(request.data) > MAX_CHUNK_BYTES:
            raise InvalidArgument(
                "a chunk is at most 2 MiB",
                reason="CHUNK_TOO_LARGE",
                violations=[_violation("data", "at most 2 MiB")],
            )
        committed = await self._service.uploads.append(
            require_caller(), workspace_id, upload_id, offset=request.offset, data=request.data
        )
        return pb.AppendUploadChunkResponse(committed_bytes=committed)

    async def CommitUpload(
        self, request: pb.CommitUploadRequest, context: Any
    ) -> pb.CommitUploadResponse:
        self._origin(context)
        check = Validator()
        workspace_id, upload_id = ids_of(UPLOAD, request.name, "name", check)
        sha256 = request.sha256.lower()
        check.check(
            len(sha256) == 64 and all(c in "0123456789abcdef" for c in sha256),
            "sha256",
            "must be 64 hex characters",
        )
        check.raise_if_any()
        committed = await self._service.uploads.commit(
            require_caller(), workspace_id, upload_id, sha256=sha256
        )
        return pb.CommitUploadResponse(file=cv.file_to_proto(committed))

    async def AbortUpload(
        self, request: pb.AbortUploadRequest, context: Any
    ) -> pb.AbortUploadResponse:
        self._origin(context)
        workspace_id, upload_id = UPLOAD.parse_field(request.name, "name")
        ended = await self._service.uploads.abort(require_caller(), workspace_id, upload_id)
        return pb.AbortUploadResponse(upload=cv.upload_to_proto(ended))

    # -- reports ---------------------------------------------------------------------------------

    async def CreateReport(
        self, request: pb.CreateReportRequest, context: Any
    ) -> pb.CreateReportResponse:
        self._origin(context)
        check = Validator()
        sent = request.report
        check_text(sent.title, check, "report.title", max_length=MAX_TITLE, required=True)
        check.check(
            sent.format in cv.REPORT_FORMAT_OF, "report.format", "must be a known ReportFormat"
        )
        format = cv.REPORT_FORMAT_OF.get(sent.format, ReportFormat.UNSPECIFIED)
        content_type = sent.content_type or CONTENT_TYPES.get(format, "")
        check.check(
            bool(content_type), "report.content_type", "is required when format is UNSPECIFIED"
        )
        _content_type(sent.content_type, "report.content_type", check)
        check_labels(sent.labels, check, "report.labels")
        check_request_id(request.request_id, check)
        if sent.session:
            ids_of(SESSION, sent.session, "report.session", check)
        if sent.task_run:
            ids_of(TASK_RUN, sent.task_run, "report.task_run", check)
        check.raise_if_any()
        expire_time = _future(sent, "report.expire_time")
        if len(sent.content) > MAX_REPORT_BYTES:
            raise InvalidArgument(
                "report content is at most 4 MiB",
                reason="CONTENT_INVALID",
                violations=[_violation("report.content", "at most 4 MiB")],
            )
        created = await self._service.reports.create(
            require_caller(),
            title=sent.title,
            content=sent.content,
            format=format,
            content_type=content_type,
            labels=dict(sent.labels),
            expire_time=expire_time,
            owner=sent.owner,
            session=sent.session,
            task_run=sent.task_run,
            request_id=request.request_id,
        )
        return pb.CreateReportResponse(report=cv.report_to_proto(created))

    async def GetReport(self, request: pb.GetReportRequest, context: Any) -> pb.GetReportResponse:
        (report_id,) = REPORT.parse_field(request.name, "name")
        found = await self._service.reports.get(require_caller(), report_id)
        content = None
        if request.view != report_pb2.REPORT_VIEW_BASIC:
            content = b"".join([b async for b in await self._service.reports.content(found)])
        return pb.GetReportResponse(report=cv.report_to_proto(found, content))

    async def ListReports(
        self, request: pb.ListReportsRequest, context: Any
    ) -> pb.ListReportsResponse:
        caller = require_caller()
        query = list_query(request, cv.REPORT_FIELDS, cv.REPORT_ORDER, caller.subject)
        found, token = await self._service.reports.list(caller, query)
        return pb.ListReportsResponse(
            reports=[cv.report_to_proto(r) for r in found], next_page_token=token
        )

    async def DeleteReport(
        self, request: pb.DeleteReportRequest, context: Any
    ) -> pb.DeleteReportResponse:
        self._origin(context)
        (report_id,) = REPORT.parse_field(request.name, "name")
        await self._service.reports.delete(require_caller(), report_id)
        return pb.DeleteReportResponse()

    async def DownloadReport(
        self, request: pb.DownloadReportRequest, context: Any
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        (report_id,) = REPORT.parse_field(request.name, "name")
        found = await self._service.reports.get(require_caller(), report_id)
        chunks = await self._service.reports.content(found)
        async for body in _bodies(found.content_type, chunks):
            yield body

    # -- archives --------------------------------------------------------------------------------

    async def CreateArchive(
        self, request: pb.CreateArchiveRequest, context: Any
    ) -> pb.CreateArchiveResponse:
        self._origin(context)
        check = Validator()
        (workspace_id,) = ids_of(WORKSPACE, request.parent, "parent", check)
        sent = request.archive
        formats = {v: k for k, v in cv.ARCHIVE_FORMATS.items()}
        check.check(
            sent.format in formats or sent.format == archive_pb2.Archive.FORMAT_UNSPECIFIED,
            "archive.format",
            "must be FORMAT_TAR_GZ or FORMAT_ZIP",
        )
        check_request_id(request.request_id, check)
        expire_time = None
        if sent.HasField("expire_time"):
            expire_time = from_timestamp(sent.expire_time, "archive.expire_time")
            check.check(
                now() < expire_time <= now() + MAX_ARCHIVE_LIFETIME,
                "archive.expire_time",
                "must be in the future, at most 30 days ahead",
            )
        check.raise_if_any()
        prefix = check_path(sent.path_prefix, "archive.path_prefix") if sent.path_prefix else ""
        created = await self._service.archives.create(
            require_caller(),
            workspace_id,
            format=formats.get(sent.format, ArchiveFormat.TAR_GZ),
            path_prefix=prefix,
            expire_time=expire_time,
            request_id=request.request_id,
        )
        return pb.CreateArchiveResponse(archive=cv.archive_to_proto(created))

    async def GetArchive(
        self, request: pb.GetArchiveRequest, context: Any
    ) -> pb.GetArchiveResponse:
        workspace_id, archive_id = ARCHIVE.parse_field(request.name, "name")
        found = await self._service.archives.get(require_caller(), workspace_id, archive_id)
        return pb.GetArchiveResponse(archive=cv.archive_to_proto(found))

    async def ListArchives(
        self, request: pb.ListArchivesRequest, context: Any
    ) -> pb.ListArchivesResponse:
        (workspace_id,) = WORKSPACE.parse_field(request.parent, "parent")
        page = page_from(request.page_size, request.page_token, fingerprint(request.parent))
        found, token = await self._service.archives.list(require_caller(), workspace_id, page)
        return pb.ListArchivesResponse(
            archives=[cv.archive_to_proto(a) for a in found], next_page_token=token
        )

    async def DeleteArchive(
        self, request: pb.DeleteArchiveRequest, context: Any
    ) -> pb.DeleteArchiveResponse:
        self._origin(context)
        workspace_id, archive_id = ARCHIVE.parse_field(request.name, "name")
        await self._service.archives.delete(require_caller(), workspace_id, archive_id)
        return pb.DeleteArchiveResponse()

    async def DownloadArchive(
        self, request: pb.DownloadArchiveRequest, context: Any
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        check = Validator()
        workspace_id, archive_id = ids_of(ARCHIVE, request.name, "name", check)
        check.check(request.offset >= 0, "offset", "must not be negative")
        check.raise_if_any()
        archive, chunks = await self._service.archives.content(
            require_caller(), workspace_id, archive_id, request.offset
        )
        async for body in _bodies(cv.archive_content_type(archive), chunks):
            yield body

    # -- usage -----------------------------------------------------------------------------------

    async def GetStorageUsage(
        self, request: pb.GetStorageUsageRequest, context: Any
    ) -> pb.GetStorageUsageResponse:
        (org_id,) = USAGE.parse_field(request.name, "name")
        figures = await self._service.usage.get(require_caller(), ORGANIZATION.format(org_id))
        usage = storage_usage_pb2.StorageUsage(
            name=figures.name,
            total=cv.bytes_to_proto(figures.total),
            owners=[
                storage_usage_pb2.OwnerStorageUsage(owner=owner, usage=cv.bytes_to_proto(b))
                for owner, b in figures.owners
            ],
            compute_time=to_timestamp(figures.compute_time),
        )
        return pb.GetStorageUsageResponse(storage_usage=usage)


def _violation(field: str, description: str) -> FieldViolation:
    return FieldViolation(field, description)


def _future(sent: Any, field_path: str) -> datetime | None:
    """The ``expire_time`` of a message the caller sent, None if unset; INVALID_ARGUMENT
    naming ``field_path`` if it is not a valid timestamp or not in the future."""
    if not sent.HasField("expire_time"):
        return None
    expire_time = from_timestamp(sent.expire_time, field_path)
    if expire_time <= now():
        raise InvalidArgument(
            f"{field_path} is in the past",
            violations=[_violation(field_path, "must be in the future")],
        )
    return expire_time


async def _bodies(
    content_type: str, chunks: AsyncIterator[bytes]
) -> AsyncIterator[httpbody_pb2.HttpBody]:
    """HttpBody messages: the content type on the first (what the edge puts in the response's
    Content-Type), the bytes in each; one message for an empty body."""
    first = True
    async for block in chunks:
        yield httpbody_pb2.HttpBody(content_type=content_type if first else "", data=block)
        first = False
    if first:
        yield httpbody_pb2.HttpBody(content_type=content_type)
