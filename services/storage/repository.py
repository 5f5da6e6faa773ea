"""The storage context's repositories and unit of work (SQLAlchemy Core)."""

from __future__ import annotations

import builtins
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from corral.libs import keyset
from corral.libs.db import UnitOfWork
from corral.libs.idempotency import SqlIdempotencyStore
from corral.libs.listing import ListQuery, Page
from corral.libs.outbox import OutboxRecords
from corral.services.storage.domain import (
    Archive,
    ArchiveFormat,
    ArchiveState,
    PendingChunk,
    Report,
    ReportFormat,
    StagedPart,
    StorageBytes,
    Upload,
    UploadState,
    Workspace,
)
from corral.services.storage.tables import (
    archives,
    file_digests,
    idempotency_keys,
    leases,
    outbox,
    reports,
    uploads,
    workspace_holds,
    workspaces,
)


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _at(value: datetime) -> datetime:
    aware = _aware(value)
    assert aware is not None
    return aware


# -- workspaces ----------------------------------------------------------------------------------


def _workspace_row(w: Workspace) -> dict[str, Any]:
    row = dict(vars(w))
    row["labels"] = json.dumps(w.labels, sort_keys=True)
    return row


def _to_workspace(row: sa.Row[Any]) -> Workspace:
    m = dict(row._mapping)
    m["labels"] = json.loads(m["labels"])
    for key in ("create_time", "update_time", "expire_time", "measure_time"):
        m[key] = _aware(m[key])
    return Workspace(**m)


class WorkspaceRepository:
    def __init__(self, connection: AsyncConnection) -> None:
        self._c = connection

    async def add(self, workspace: Workspace) -> None:
        await self._c.execute(workspaces.insert().values(**_workspace_row(workspace)))

    async def get(self, workspace_id: str) -> Workspace | None:
        query = sa.select(workspaces).where(workspaces.c.id == workspace_id)
        row = (await self._c.execute(query)).first()
        return None if row is None else _to_workspace(row)

    async def save(self, workspace: Workspace, expected_version: int) -> bool:
        """Write ``workspace`` if its row is still at ``expected_version``."""
        result = await self._c.execute(
            workspaces.update()
            .where(workspaces.c.id == workspace.id, workspaces.c.version == expected_version)
            .values(**_workspace_row(workspace))
        )
        return bool(result.rowcount == 1)

    async def measured(
        self, workspace_id: str, size: int, count: int, at: datetime, accounting: int | None
    ) -> bool:
        """Record a measurement; with ``accounting``, only if the holds are still at that
        version (and bump it: the holds change with it)."""
        c = workspaces.c
        query = workspaces.update().where(c.id == workspace_id)
        values: dict[str, Any] = {"size_bytes": size, "file_count": count, "measure_time": at}
        if accounting is not None:
            query = query.where(c.accounting_version == accounting)
            values["accounting_version"] = accounting + 1
        changed = c.size_bytes != size
        values["update_time"] = sa.case((changed, at), else_=c.update_time)
        result = await self._c.execute(query.values(**values))
        return bool(result.rowcount == 1)

    async def delete(self, workspace_id: str) -> None:
        for table in (workspace_holds, file_digests):
            await self._c.execute(table.delete().where(table.c.workspace_id == workspace_id))
        await self._c.execute(workspaces.delete().where(workspaces.c.id == workspace_id))

    async def list(self, query: ListQuery) -> builtins.list[Workspace]:
        """One page (with one row to spare)."""
        rows = await self._c.execute(keyset.select_page(workspaces, query))
        return [_to_workspace(row) for row in rows]

    async def ids(
        self, *, expired_before: datetime | None = None, after: str = "", limit: int = 1000
    ) -> builtins.list[str]:
        """Workspace ids in id order after ``after``; with ``expired_before``, those whose
        expire_time has passed."""
        c = workspaces.c
        query = sa.select(c.id).where(c.id > after).order_by(c.id).limit(limit)
        if expired_before is not None:
            query = query.where(c.expire_time <= expired_before)
        return [row[0] for row in await self._c.execute(query)]

    # the ledger reservations holding its bytes

    async def holds(self, workspace_id: str) -> dict[str, int]:
        query = sa.select(workspace_holds.c.reservation, workspace_holds.c.bytes).where(
            workspace_holds.c.workspace_id == workspace_id
        )
        return {row[0]: int(row[1]) for row in await self._c.execute(query)}

    async def add_hold(self, workspace_id: str, reservation: str, size: int) -> None:
        await self._c.execute(
            workspace_holds.insert().values(
                workspace_id=workspace_id, reservation=reservation, bytes=size
            )
        )

    async def drop_holds(self, workspace_id: str) -> builtins.list[str]:
        held = list(await self.holds(workspace_id))
        await self._c.execute(
            workspace_holds.delete().where(workspace_holds.c.workspace_id == workspace_id)
        )
        return held

    # what is known of its files' content

    async def digest(self, workspace_id: str, path: str) -> tuple[str, str, str] | None:
        """(fingerprint, sha256, content type) last recorded for the file at ``path``."""
        c = file_digests.c
        query = sa.select(c.fingerprint, c.sha256, c.content_type).where(
            c.workspace_id == workspace_id, c.path == path
        )
        row = (await self._c.execute(query)).first()
        return None if row is None else (row[0], row[1], row[2])

    async def digests(
        self, workspace_id: str, paths: Sequence[str]
    ) -> dict[str, tuple[str, str, str]]:
        if not paths:
            return {}
        c = file_digests.c
        query = sa.select(c.path, c.fingerprint, c.sha256, c.content_type).where(
            c.workspace_id == workspace_id, c.path.in_(list(paths))
        )
        return {row[0]: (row[1], row[2], row[3]) for row in await self._c.execute(query)}

    async def remember_digest(
        self, workspace_id: str, path: str, fingerprint: str, sha256: str, content_type: str
    ) -> None:
        c = file_digests.c
        await self._c.execute(
            file_digests.delete().where(c.workspace_id == workspace_id, c.path == path)
        )
        await self._c.execute(
            file_digests.insert().values(
                workspace_id=workspace_id,
                path=path,
                fingerprint=fingerprint,
                sha256=sha256,
                content_type=content_type,
            )
        )

    async def forget_digest(self, workspace_id: str, path: str) -> None:
        c = file_digests.c
        await self._c.execute(
            file_digests.delete().where(c.workspace_id == workspace_id, c.path == path)
        )


# -- uploads -------------------------------------------------------------------------------------


def _upload_row(u: Upload) -> dict[str, Any]:
    row = dict(vars(u))
    row["state"] = u.state.value
    row["parts"] = json.dumps([[p.number, p.size, p.etag] for p in u.parts])
    row["pending"] = json.dumps([[p.key, p.size] for p in u.pending])
    row["holds"] = json.dumps(u.holds)
    return row


def _to_upload(row: sa.Row[Any]) -> Upload:
    m = dict(row._mapping)
    m["state"] = UploadState(m["state"])
    m["parts"] = [StagedPart(*p) for p in json.loads(m["parts"])]
    m["pending"] = [PendingChunk(*p) for p in json.loads(m["pending"])]
    m["holds"] = json.loads(m["holds"])
    for key in ("create_time", "update_time", "expire_time", "busy_until"):
        m[key] = _aware(m[key])
    return Upload(**m)


class UploadRepository:
    def __init__(self, connection: AsyncConnection) -> None:
        self._c = connection

    async def add(self, upload: Upload) -> None:
        await self._c.execute(uploads.insert().values(**_upload_row(upload)))

    async def get(self, upload_id: str) -> Upload | None:
        row = (await self._c.execute(sa.select(uploads).where(uploads.c.id == upload_id))).first()
        return None if row is None else _to_upload(row)

    async def save(self, upload: Upload, expected_version: int) -> bool:
        result = await self._c.execute(
            uploads.update()
            .where(uploads.c.id == upload.id, uploads.c.version == expected_version)
            .values(**_upload_row(upload))
        )
        return bool(result.rowcount == 1)

    async def claim(self, upload_id: str, version: int, at: datetime, until: datetime) -> bool:
        """Take the upload for one append or commit: it is ACTIVE, unchanged since read, and no
        other claim is live (a crashed holder's lapses at ``busy_until``)."""
        c = uploads.c
        result = await self._c.execute(
            uploads.update()
            .where(
                c.id == upload_id,
                c.version == version,
                c.state == UploadState.ACTIVE.value,
                sa.or_(c.busy_until.is_(None), c.busy_until < at),
            )
            .values(busy_until=until, version=version + 1)
        )
        return bool(result.rowcount == 1)

    async def in_workspace(self, workspace_id: str) -> builtins.list[Upload]:
        query = sa.select(uploads).where(uploads.c.workspace_id == workspace_id)
        return [_to_upload(row) for row in await self._c.execute(query)]

    async def expired(self, at: datetime, limit: int) -> builtins.list[Upload]:
        c = uploads.c
        query = (
            sa.select(uploads)
            .where(c.state == UploadState.ACTIVE.value, c.expire_time <= at)
            .where(sa.or_(c.busy_until.is_(None), c.busy_until < at))
            .order_by(c.expire_time)
            .limit(limit)
        )
        return [_to_upload(row) for row in await self._c.execute(query)]

    async def ended_before(self, at: datetime, limit: int) -> builtins.list[str]:
        c = uploads.c
        query = (
            sa.select(c.id)
            .where(c.state != UploadState.ACTIVE.value, c.update_time <= at)
            .limit(limit)
        )
        return [row[0] for row in await self._c.execute(query)]

    async def delete(self, upload_ids: Sequence[str]) -> None:
        if upload_ids:
            await self._c.execute(uploads.delete().where(uploads.c.id.in_(list(upload_ids))))


# -- reports and archives ------------------------------------------------------------------------


def _report_row(r: Report) -> dict[str, Any]:
    row = dict(vars(r))
    row["format"] = r.format.value
    row["labels"] = json.dumps(r.labels, sort_keys=True)
    return row


def _to_report(row: sa.Row[Any]) -> Report:
    m = dict(row._mapping)
    m["format"] = ReportFormat(m["format"])
    m["labels"] = json.loads(m["labels"])
    m["create_time"] = _at(m["create_time"])
    m["expire_time"] = _aware(m["expire_time"])
    return Report(**m)


class ReportRepository:
    def __init__(self, connection: AsyncConnection) -> None:
        self._c = connection

    async def add(self, report: Report) -> None:
        await self._c.execute(reports.insert().values(**_report_row(report)))

    async def get(self, report_id: str) -> Report | None:
        row = (await self._c.execute(sa.select(reports).where(reports.c.id == report_id))).first()
        return None if row is None else _to_report(row)

    async def delete(self, report_id: str) -> bool:
        result = await self._c.execute(reports.delete().where(reports.c.id == report_id))
        return bool(result.rowcount == 1)

    async def list(self, query: ListQuery) -> builtins.list[Report]:
        """One page (with one row to spare)."""
        rows = await self._c.execute(keyset.select_page(reports, query))
        return [_to_report(row) for row in rows]

    async def expired(self, at: datetime, limit: int) -> builtins.list[Report]:
        query = sa.select(reports).where(reports.c.expire_time <= at).limit(limit)
        return [_to_report(row) for row in await self._c.execute(query)]


def _archive_row(a: Archive) -> dict[str, Any]:
    row = dict(vars(a))
    row["format"] = a.format.value
    row["state"] = a.state.value
    return row


def _to_archive(row: sa.Row[Any]) -> Archive:
    m = dict(row._mapping)
    m["format"] = ArchiveFormat(m["format"])
    m["state"] = ArchiveState(m["state"])
    m["create_time"] = _at(m["create_time"])
    m["expire_time"] = _at(m["expire_time"])
    m["end_time"] = _aware(m["end_time"])
    return Archive(**m)


class ArchiveRepository:
    def __init__(self, connection: AsyncConnection) -> None:
        self._c = connection

    async def add(self, archive: Archive) -> None:
        await self._c.execute(archives.insert().values(**_archive_row(archive)))

    async def get(self, archive_id: str) -> Archive | None:
        query = sa.select(archives).where(archives.c.id == archive_id)
        row = (await self._c.execute(query)).first()
        return None if row is None else _to_archive(row)

    async def save(self, archive: Archive) -> None:
        await self._c.execute(
            archives.update().where(archives.c.id == archive.id).values(**_archive_row(archive))
        )

    async def delete(self, archive_id: str) -> bool:
        result = await self._c.execute(archives.delete().where(archives.c.id == archive_id))
        return bool(result.rowcount == 1)

    async def list(self, workspace_id: str, page: Page) -> builtins.list[Archive]:
        query = sa.select(archives).where(archives.c.workspace_id == workspace_id)
        query = keyset.page_query(
            query, archives.c.create_time, archives.c.id, descending=True, page=page
        )
        return [_to_archive(row) for row in await self._c.execute(query)]

    async def in_workspace(self, workspace_id: str) -> builtins.list[Archive]:
        query = sa.select(archives).where(archives.c.workspace_id == workspace_id)
        return [_to_archive(row) for row in await self._c.execute(query)]

    async def expired(self, at: datetime, limit: int) -> builtins.list[Archive]:
        query = sa.select(archives).where(archives.c.expire_time <= at).limit(limit)
        return [_to_archive(row) for row in await self._c.execute(query)]


# -- usage ---------------------------------------------------------------------------------------


class UsageQueries:
    def __init__(self, connection: AsyncConnection) -> None:
        self._c = connection

    async def by_owner(self, organization: str) -> dict[str, StorageBytes]:
        """Every owner's figures in ``organization``."""
        out: dict[str, StorageBytes] = {}

        def line(owner: str) -> StorageBytes:
            return out.setdefault(owner, StorageBytes())

        w = workspaces.c
        query = (
            sa.select(
                w.owner, sa.func.sum(w.size_bytes), sa.func.sum(w.file_count), sa.func.count()
            )
            .where(w.organization == organization)
            .group_by(w.owner)
        )
        for owner, size, files, count in await self._c.execute(query):
            figures = line(owner)
            figures.workspace_bytes, figures.file_count = int(size or 0), int(files or 0)
            figures.workspace_count = int(count)
        r = reports.c
        query = (
            sa.select(r.owner, sa.func.sum(r.size_bytes), sa.func.count())
            .where(r.organization == organization)
            .group_by(r.owner)
        )
        for owner, size, count in await self._c.execute(query):
            line(owner).report_bytes, line(owner).report_count = int(size or 0), int(count)
        a = archives.c
        query = (
            sa.select(w.owner, sa.func.sum(a.size_bytes), sa.func.count())
            .select_from(archives.join(workspaces, workspaces.c.id == a.workspace_id))
            .where(a.organization == organization, a.state == ArchiveState.READY.value)
            .group_by(w.owner)
        )
        for owner, size, count in await self._c.execute(query):
            line(owner).archive_bytes, line(owner).archive_count = int(size or 0), int(count)
        u = uploads.c
        query = (
            sa.select(u.charged_to, sa.func.sum(u.committed_bytes))
            .where(u.organization == organization, u.state == UploadState.ACTIVE.value)
            .group_by(u.charged_to)
        )
        for owner, size in await self._c.execute(query):
            line(owner).pending_upload_bytes = int(size or 0)
        return out


# -- leases ------------------------------------------------------------------------------------


class LeaseRepository:
    def __init__(self, connection: AsyncConnection) -> None:
        self._c = connection

    async def take(self, name: str, holder: str, at: datetime, until: datetime) -> bool:
        """Hold ``name`` until ``until`` if it is free, lapsed, or already ``holder``'s."""
        c = leases.c
        result = await self._c.execute(
            leases.update()
            .where(c.name == name, sa.or_(c.holder == holder, c.until < at))
            .values(holder=holder, until=until)
        )
        if result.rowcount == 1:
            return True
        found = await self._c.execute(sa.select(c.name).where(c.name == name))
        if found.first() is not None:
            return False
        await self._c.execute(leases.insert().values(name=name, holder=holder, until=until))
        return True


class StorageUnitOfWork(UnitOfWork):
    workspaces: WorkspaceRepository
    uploads: UploadRepository
    reports: ReportRepository
    archives: ArchiveRepository
    usage: UsageQueries
    leases: LeaseRepository
    idempotency: SqlIdempotencyStore
    outbox: OutboxRecords

    def _bind(self) -> None:
        self.workspaces = WorkspaceRepository(self.connection)
        self.uploads = UploadRepository(self.connection)
        self.reports = ReportRepository(self.connection)
        self.archives = ArchiveRepository(self.connection)
        self.usage = UsageQueries(self.connection)
        self.leases = LeaseRepository(self.connection)
        self.idempotency = SqlIdempotencyStore(self.connection, idempotency_keys)
        self.outbox = OutboxRecords(self.connection, outbox)
