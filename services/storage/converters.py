"""Domain <-> ``corral.storage.v1`` messages, and what List requests may filter and sort on."""

from __future__ import annotations

from corral.libs.listing import FieldSpec, LabelledFields, enum_value, parse_datetime
from corral.libs.timestamps import to_timestamp
from corral.services.storage.domain import (
    ARCHIVE_CONTENT_TYPES,
    Archive,
    ArchiveFormat,
    Report,
    ReportFormat,
    StorageBytes,
    Upload,
    UploadState,
    Workspace,
)
from corral.services.storage.files import FileInfo
from corral.services.storage.paths import file_name
from corral.storage.v1 import (
    archive_pb2,
    file_pb2,
    report_pb2,
    storage_usage_pb2,
    upload_pb2,
    workspace_pb2,
)

REPORT_FORMATS = {
    ReportFormat.UNSPECIFIED: report_pb2.REPORT_FORMAT_UNSPECIFIED,
    ReportFormat.MARKDOWN: report_pb2.REPORT_FORMAT_MARKDOWN,
    ReportFormat.JSON: report_pb2.REPORT_FORMAT_JSON,
    ReportFormat.HTML: report_pb2.REPORT_FORMAT_HTML,
}
REPORT_FORMAT_OF = {value: key for key, value in REPORT_FORMATS.items()}
ARCHIVE_FORMATS = {
    ArchiveFormat.TAR_GZ: archive_pb2.Archive.FORMAT_TAR_GZ,
    ArchiveFormat.ZIP: archive_pb2.Archive.FORMAT_ZIP,
}


WORKSPACE_FIELDS = LabelledFields(
    {
        "session": FieldSpec("session"),
        "owner": FieldSpec("owner"),
        "source_workspace": FieldSpec("source_workspace"),
        "organization": FieldSpec("organization"),
        "create_time": FieldSpec("create_time", parse_datetime),
        "update_time": FieldSpec("update_time", parse_datetime),
    }
)
WORKSPACE_ORDER = {
    "create_time": "create_time",
    "update_time": "update_time",
    "size_bytes": "size_bytes",
}
REPORT_FIELDS = LabelledFields(
    {
        "session": FieldSpec("session"),
        "task_run": FieldSpec("task_run", prefix=True),
        "format": FieldSpec("format", enum_value({f.value: f.value for f in ReportFormat})),
        "content_type": FieldSpec("content_type", prefix=True),
        "owner": FieldSpec("owner"),
        "creator": FieldSpec("creator"),
        "title": FieldSpec("title", prefix=True),
        "organization": FieldSpec("organization"),
        "create_time": FieldSpec("create_time", parse_datetime),
    }
)
REPORT_ORDER = {"create_time": "create_time", "title": "title", "size_bytes": "size_bytes"}


def workspace_to_proto(w: Workspace) -> workspace_pb2.Workspace:
    return workspace_pb2.Workspace(
        name=w.name,
        organization=w.organization,
        session=w.session,
        owner=w.owner,
        size_bytes=w.size_bytes,
        file_count=w.file_count,
        source_workspace=w.source_workspace,
        create_time=to_timestamp(w.create_time),
        update_time=to_timestamp(w.update_time),
        labels=w.labels,
        etag=w.etag,
        expire_time=to_timestamp(w.expire_time),
        measure_time=to_timestamp(w.measure_time),
    )


def file_to_proto(f: FileInfo) -> file_pb2.File:
    return file_pb2.File(
        name=f.name,
        path=f.path,
        size_bytes=f.size,
        sha256=f.sha256,
        content_type=f.content_type,
        update_time=to_timestamp(f.update_time),
    )


def upload_to_proto(u: Upload) -> upload_pb2.Upload:
    return upload_pb2.Upload(
        name=u.name,
        path=u.path,
        size_bytes=u.declared_size,
        content_type=u.content_type,
        overwrite=u.overwrite,
        state=upload_pb2.Upload.State.Value(f"STATE_{u.state.value}"),
        committed_bytes=u.committed_bytes,
        creator=u.creator,
        create_time=to_timestamp(u.create_time),
        expire_time=to_timestamp(u.expire_time) if u.state is UploadState.ACTIVE else None,
        file=file_name(u.workspace_id, u.path) if u.state is UploadState.COMMITTED else "",
        failure_reason=u.failure_reason,
        update_time=to_timestamp(u.update_time),
    )


def report_to_proto(r: Report, content: bytes | None = None) -> report_pb2.Report:
    return report_pb2.Report(
        name=r.name,
        organization=r.organization,
        session=r.session,
        task_run=r.task_run,
        format=REPORT_FORMATS[r.format],
        title=r.title,
        content=content or b"",
        size_bytes=r.size_bytes,
        sha256=r.sha256,
        labels=r.labels,
        creator=r.creator,
        create_time=to_timestamp(r.create_time),
        owner=r.owner,
        content_type=r.content_type,
        expire_time=to_timestamp(r.expire_time),
    )


def archive_to_proto(a: Archive) -> archive_pb2.Archive:
    return archive_pb2.Archive(
        name=a.name,
        format=ARCHIVE_FORMATS[a.format],
        path_prefix=a.path_prefix,
        state=archive_pb2.Archive.State.Value(f"STATE_{a.state.value}"),
        size_bytes=a.size_bytes,
        sha256=a.sha256,
        file_count=a.file_count,
        creator=a.creator,
        create_time=to_timestamp(a.create_time),
        end_time=to_timestamp(a.end_time),
        expire_time=to_timestamp(a.expire_time),
        failure_reason=a.failure_reason,
    )


def archive_content_type(a: Archive) -> str:
    return ARCHIVE_CONTENT_TYPES[a.format]


def bytes_to_proto(b: StorageBytes) -> storage_usage_pb2.StorageBytes:
    return storage_usage_pb2.StorageBytes(
        total_bytes=b.total_bytes,
        workspace_bytes=b.workspace_bytes,
        report_bytes=b.report_bytes,
        archive_bytes=b.archive_bytes,
        pending_upload_bytes=b.pending_upload_bytes,
        workspace_count=b.workspace_count,
        file_count=b.file_count,
        report_count=b.report_count,
        archive_count=b.archive_count,
    )
