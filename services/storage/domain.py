"""The storage context's domain: workspaces, uploads, reports, archives, and who may touch them.

Plain Python: no grpc, no SQL. The visibility rule is the session's (services/session/domain.py),
written in the protos: "readers" of a workspace or report are its owner, the admins and viewers
of its organisation, superusers and Corral's internal services; "writers" are its owner (with the
user role), the organisation's admins, superusers and services. Nobody else learns that it
exists (NOT_FOUND, never PERMISSION_DENIED).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from corral.libs.auth.caller import Caller
from corral.libs.errors import FailedPrecondition, NotFound, PermissionDenied
from corral.libs.etags import etag_of
from corral.libs.names import ResourcePattern

WORKSPACE = ResourcePattern("workspaces/{workspace}")
UPLOAD = ResourcePattern("workspaces/{workspace}/uploads/{upload}")
ARCHIVE = ResourcePattern("workspaces/{workspace}/archives/{archive}")
REPORT = ResourcePattern("reports/{report}")
SESSION = ResourcePattern("sessions/{session}")
ORGANIZATION = ResourcePattern("organizations/{organization}")
USER = ResourcePattern("organizations/{organization}/users/{user}")
SERVICE_ACCOUNT = ResourcePattern("organizations/{organization}/serviceAccounts/{service_account}")
TASK_RUN = ResourcePattern("tasks/{task}/runs/{run}")
USAGE = ResourcePattern("organizations/{organization}/storageUsage")

MAX_CHUNK_BYTES = 2 * 1024 * 1024
MAX_WRITE_BYTES = 4 * 1024 * 1024
MAX_REPORT_BYTES = 4 * 1024 * 1024
UPLOAD_LIFETIME = timedelta(hours=24)
ARCHIVE_LIFETIME = timedelta(hours=24)
MAX_ARCHIVE_LIFETIME = timedelta(days=30)


def now() -> datetime:
    return datetime.now(UTC)


def is_service(caller: Caller) -> bool:
    """Corral's own services (the role identity gives its internal service accounts)."""
    return caller.is_service


def require_service(caller: Caller) -> Caller:
    """Internal methods: Corral's services only (a superuser is a person: refused)."""
    if not is_service(caller):
        raise PermissionDenied(
            "this method is internal: Corral's services only", reason="SERVICE_ONLY"
        )
    return caller


def organization_of(principal: str) -> str:
    """``organizations/acme`` of a user or service account name; "" if it is neither."""
    ids = USER.parse(principal) or SERVICE_ACCOUNT.parse(principal)
    return ORGANIZATION.format(ids[0]) if ids else ""


# -- who may see and change what --------------------------------------------------------------


def can_read(caller: Caller, organization: str, owner: str) -> bool:
    if caller.is_superuser or is_service(caller):
        return True
    if caller.organization != organization:
        return False
    return caller.subject == owner or caller.has_role("admin", "viewer")


def can_write(caller: Caller, organization: str, owner: str) -> bool:
    if caller.is_superuser or is_service(caller):
        return True
    if caller.organization != organization:
        return False
    if caller.has_role("admin"):
        return True
    return caller.subject == owner and caller.has_role("user")


def read_only() -> PermissionDenied:
    return PermissionDenied("your role may read this but not change it", reason="READ_ONLY_ACCESS")


def not_found(name: str, reason: str) -> NotFound:
    return NotFound(f"{name} does not exist", reason=reason, metadata={"name": name})


# -- workspaces ----------------------------------------------------------------------------------


@dataclass
class Workspace:
    id: str
    organization: str
    session: str
    owner: str
    labels: dict[str, str]
    create_time: datetime
    update_time: datetime
    source_workspace: str = ""
    expire_time: datetime | None = None
    size_bytes: int = 0  # as last measured
    file_count: int = 0
    measure_time: datetime | None = None
    version: int = 1
    accounting_version: int = 0  # bumped by every change of its holds on the quota

    @property
    def name(self) -> str:
        return WORKSPACE.format(self.id)

    @property
    def etag(self) -> str:
        return etag_of(self.name, self.version)


def authorize_read(caller: Caller, workspace: Workspace | None, name: str) -> Workspace:
    if workspace is None or not can_read(caller, workspace.organization, workspace.owner):
        raise not_found(name, "WORKSPACE_NOT_FOUND")
    return workspace


def authorize_write(caller: Caller, workspace: Workspace | None, name: str) -> Workspace:
    found = authorize_read(caller, workspace, name)
    if not can_write(caller, found.organization, found.owner):
        raise read_only()
    return found


def authorize_delete(caller: Caller, workspace: Workspace | None, name: str) -> Workspace:
    """A workspace goes with its session: services, superusers and admins delete it."""
    found = authorize_read(caller, workspace, name)
    if not (is_service(caller) or caller.has_role("admin")):
        raise read_only()
    return found


# -- uploads -------------------------------------------------------------------------------------


class UploadState(StrEnum):
    ACTIVE = "ACTIVE"
    COMMITTED = "COMMITTED"
    ABORTED = "ABORTED"
    EXPIRED = "EXPIRED"
    FAILED = "FAILED"


@dataclass(frozen=True)
class StagedPart:
    """A part handed to the blob store's multipart upload (``etag``: the store's token)."""

    number: int
    size: int
    etag: str


@dataclass(frozen=True)
class PendingChunk:
    """Bytes waiting for enough company to make a part (the store's minimum part size)."""

    key: str
    size: int


@dataclass
class Upload:
    id: str
    workspace_id: str
    organization: str
    path: str
    declared_size: int
    content_type: str
    overwrite: bool
    creator: str
    charged_to: str  # whose quota holds its bytes: the workspace's owner
    create_time: datetime
    update_time: datetime
    expire_time: datetime
    blob_key: str
    multipart_id: str
    state: UploadState = UploadState.ACTIVE
    committed_bytes: int = 0
    parts: list[StagedPart] = field(default_factory=list)
    pending: list[PendingChunk] = field(default_factory=list)
    holds: list[str] = field(default_factory=list)  # ledger reservations for its bytes
    held_bytes: int = 0
    sha256: str = ""
    failure_reason: str = ""
    busy_until: datetime | None = None
    version: int = 1

    @property
    def name(self) -> str:
        return UPLOAD.format(self.workspace_id, self.id)

    @property
    def pending_bytes(self) -> int:
        return sum(chunk.size for chunk in self.pending)

    def require_active(self, at: datetime) -> None:
        state = UploadState.EXPIRED if self.expired(at) else self.state
        if state is not UploadState.ACTIVE:
            raise FailedPrecondition(
                f"the upload is {state.value}",
                reason="UPLOAD_NOT_ACTIVE",
                metadata={"state": state.value},
            )

    def expired(self, at: datetime) -> bool:
        return self.state is UploadState.ACTIVE and self.expire_time <= at


def authorize_upload(
    caller: Caller, upload: Upload | None, workspace: Workspace | None, name: str, *, drive: bool
) -> tuple[Upload, Workspace]:
    """Seen by its creator and the workspace's writers; driven (append, commit) by its creator
    and services only."""
    if upload is None or workspace is None:
        raise not_found(name, "UPLOAD_NOT_FOUND")
    mine = caller.subject == upload.creator and caller.organization == upload.organization
    if not (mine or can_write(caller, workspace.organization, workspace.owner)):
        raise not_found(name, "UPLOAD_NOT_FOUND")
    if drive and not (mine or is_service(caller)):
        raise read_only()
    return upload, workspace


# -- reports -------------------------------------------------------------------------------------


class ReportFormat(StrEnum):
    UNSPECIFIED = "UNSPECIFIED"
    MARKDOWN = "MARKDOWN"
    JSON = "JSON"
    HTML = "HTML"


CONTENT_TYPES = {
    ReportFormat.MARKDOWN: "text/markdown; charset=utf-8",
    ReportFormat.JSON: "application/json",
    ReportFormat.HTML: "text/html; charset=utf-8",
}


@dataclass
class Report:
    id: str
    organization: str
    owner: str
    creator: str
    title: str
    format: ReportFormat
    content_type: str
    size_bytes: int
    sha256: str
    labels: dict[str, str]
    create_time: datetime
    blob_key: str
    session: str = ""
    task_run: str = ""
    expire_time: datetime | None = None
    hold: str = ""

    @property
    def name(self) -> str:
        return REPORT.format(self.id)


def authorize_report(caller: Caller, report: Report | None, name: str, *, write: bool) -> Report:
    if report is None or not can_read(caller, report.organization, report.owner):
        raise not_found(name, "REPORT_NOT_FOUND")
    if write and not can_write(caller, report.organization, report.owner):
        raise read_only()
    return report


# -- archives ------------------------------------------------------------------------------------


class ArchiveFormat(StrEnum):
    TAR_GZ = "TAR_GZ"
    ZIP = "ZIP"


class ArchiveState(StrEnum):
    BUILDING = "BUILDING"
    READY = "READY"
    FAILED = "FAILED"


ARCHIVE_CONTENT_TYPES = {
    ArchiveFormat.TAR_GZ: "application/gzip",
    ArchiveFormat.ZIP: "application/zip",
}


@dataclass
class Archive:
    id: str
    workspace_id: str
    organization: str
    format: ArchiveFormat
    path_prefix: str
    creator: str
    create_time: datetime
    expire_time: datetime
    blob_key: str
    state: ArchiveState = ArchiveState.BUILDING
    size_bytes: int = 0
    sha256: str = ""
    file_count: int = 0
    end_time: datetime | None = None
    failure_reason: str = ""
    hold: str = ""

    @property
    def name(self) -> str:
        return ARCHIVE.format(self.workspace_id, self.id)


# -- usage ---------------------------------------------------------------------------------------


@dataclass
class StorageBytes:
    workspace_bytes: int = 0
    report_bytes: int = 0
    archive_bytes: int = 0
    pending_upload_bytes: int = 0
    workspace_count: int = 0
    file_count: int = 0
    report_count: int = 0
    archive_count: int = 0

    @property
    def total_bytes(self) -> int:
        return (
            self.workspace_bytes
            + self.report_bytes
            + self.archive_bytes
            + self.pending_upload_bytes
        )

    def add(self, other: StorageBytes) -> None:
        for name in vars(other):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def authorize_usage(caller: Caller, organization: str, name: str) -> bool:
    """Whether the caller sees every owner's line (else only their own); NOT_FOUND for
    outsiders."""
    if caller.is_superuser or is_service(caller):
        return True
    if caller.organization != organization:
        raise not_found(name, "NOT_FOUND")
    return caller.has_role("admin", "viewer")
