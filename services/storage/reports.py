"""Reports (documents kept in the blob store) and archives (workspaces packed into one blob).

Both keep their bytes in the blob store and hold them on their owner's storage quota: a hold
before the bytes are accepted, settled with their size, released (through the outbox) when
they are deleted or expire.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from datetime import datetime

from corral.libs.auth.caller import Caller
from corral.libs.errors import (
    CorralError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    Unimplemented,
)
from corral.libs.idempotency import CreateRequest, create_once
from corral.libs.listing import ListQuery, Page, finish_page, page_of
from corral.libs.names import new_id
from corral.services.storage.base import Storage
from corral.services.storage.domain import (
    ARCHIVE,
    ARCHIVE_LIFETIME,
    REPORT,
    Archive,
    ArchiveFormat,
    ArchiveState,
    Report,
    ReportFormat,
    authorize_report,
    is_service,
    not_found,
    organization_of,
    read_only,
)
from corral.services.storage.workspaces import Workspaces, visible_to

log = logging.getLogger("corral.storage")


def _violation(field: str, description: str, reason: str | None = None) -> InvalidArgument:
    return InvalidArgument(
        f"report.{field} {description}",
        reason=reason,
        violations=[FieldViolation(f"report.{field}", description)],
    )


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


class Reports:
    def __init__(self, storage: Storage) -> None:
        self._s = storage

    async def create(
        self,
        caller: Caller,
        *,
        title: str,
        content: bytes,
        format: ReportFormat,
        content_type: str,
        labels: dict[str, str],
        expire_time: datetime | None,
        owner: str,
        session: str,
        task_run: str,
        request_id: str,
    ) -> Report:
        if is_service(caller):
            if not owner:
                raise _violation("owner", "is required from a Corral service")
            organization = organization_of(owner)
        else:
            organization = caller.organization
            if not caller.has_role("admin", "user"):
                raise read_only()
            if owner not in ("", caller.subject):
                raise _violation("owner", "is set by Corral services only")
            if session or task_run:
                field = "session" if session else "task_run"
                raise _violation(field, "is set by Corral services only")
            owner = caller.subject
        if format is ReportFormat.JSON:
            try:
                json.loads(content)
            except ValueError as exc:
                raise _violation("content", "is not a JSON document", "CONTENT_INVALID") from exc
            except RecursionError as exc:  # nested deeper than the decoder goes
                raise _violation("content", "is nested too deeply", "CONTENT_INVALID") from exc
        payload: list[object] = [title, content, format.value, content_type]
        payload += [sorted(labels.items()), expire_time, owner, session, task_run]
        request = CreateRequest.of("CreateReport", caller.subject, request_id, payload)

        async def make(request: CreateRequest) -> Report:
            report_id = new_id()
            name = REPORT.format(report_id)
            hold = ""
            if content:
                hold = await self._s.accounting.hold(organization, owner, len(content), name)
            key = f"reports/{organization.removeprefix('organizations/')}/{report_id}"
            try:
                stored = await self._s.blobs.put(key, _once(content))
                if hold:
                    await self._s.accounting.settle(hold, stored.size)
                report = Report(
                    id=report_id,
                    organization=organization,
                    owner=owner,
                    creator=caller.subject,
                    title=title,
                    format=format,
                    content_type=content_type,
                    size_bytes=stored.size,
                    sha256=stored.sha256 or "",
                    labels=labels,
                    create_time=self._s.clock(),
                    blob_key=key,
                    session=session,
                    task_run=task_run,
                    expire_time=expire_time,
                    hold=hold,
                )
                async with self._s.uow() as uow:
                    await request.remember(uow.idempotency, name, report.create_time.timestamp())
                    await uow.reports.add(report)
                    send = await self._s.audited(
                        uow,
                        caller,
                        "storage.reports.create",
                        name,
                        {"bytes": str(stored.size), "owner": owner},
                        organization=organization,
                    )
                    await uow.commit()
            except BaseException:
                await self._s.blobs.delete(key)
                await self._s.accounting.give_back(organization, [hold])
                raise
            send()
            return report

        async def replayed(name: str) -> Report:
            (report_id,) = REPORT.parse_field(name, "name")
            return await self.get(caller, report_id)

        return await create_once(request, self._s.earlier, make, replayed)

    async def get(self, caller: Caller, report_id: str) -> Report:
        async with self._s.uow() as uow:
            found = await uow.reports.get(report_id)
        return authorize_report(caller, found, REPORT.format(report_id), write=False)

    async def content(self, report: Report) -> AsyncIterator[bytes]:
        return await self._s.blobs.get(report.blob_key)

    async def list(self, caller: Caller, query: ListQuery) -> tuple[list[Report], str]:
        async with self._s.uow() as uow:
            rows = await uow.reports.list(visible_to(caller, query))
        return page_of(rows, query)

    async def delete(self, caller: Caller, report_id: str) -> None:
        async with self._s.uow() as uow:
            found = await uow.reports.get(report_id)
        report = authorize_report(caller, found, REPORT.format(report_id), write=True)
        await self.remove(report, caller, "storage.reports.delete")

    async def remove(self, report: Report, actor: Caller, action: str) -> None:
        async with self._s.uow() as uow:
            if not await uow.reports.delete(report.id):
                return  # someone else removed it first
            release = await self._s.accounting.release_later(
                uow, report.organization, [report.hold]
            )
            send = await self._s.audited(
                uow, actor, action, report.name, organization=report.organization
            )
            await uow.commit()
        send()
        release()
        await self._s.blobs.delete(report.blob_key)


class Archives:
    def __init__(self, storage: Storage, workspaces: Workspaces) -> None:
        self._s = storage
        self._workspaces = workspaces

    async def create(
        self,
        caller: Caller,
        workspace_id: str,
        *,
        format: ArchiveFormat,
        path_prefix: str,
        expire_time: datetime | None,
        request_id: str,
    ) -> Archive:
        workspace = await self._workspaces.for_write(caller, workspace_id)
        packer = self._s.packer
        if packer is None:
            raise Unimplemented("this deployment builds no archives yet", reason="UNIMPLEMENTED")
        payload = [workspace_id, format.value, path_prefix, expire_time]
        request = CreateRequest.of("CreateArchive", caller.subject, request_id, payload)

        async def make(request: CreateRequest) -> Archive:
            archive_id = new_id()
            at = self._s.clock()
            archive = Archive(
                id=archive_id,
                workspace_id=workspace_id,
                organization=workspace.organization,
                format=format,
                path_prefix=path_prefix,
                creator=caller.subject,
                create_time=at,
                expire_time=expire_time or at + ARCHIVE_LIFETIME,
                blob_key=f"archives/{workspace_id}/{archive_id}",
            )
            async with self._s.uow() as uow:
                await request.remember(uow.idempotency, archive.name, at.timestamp())
                await uow.archives.add(archive)
                send = await self._s.audited(
                    uow,
                    caller,
                    "storage.archives.create",
                    archive.name,
                    organization=workspace.organization,
                )
                await uow.commit()
            send()
            self._s.background(lambda: self._build(archive, workspace.owner))
            return archive

        async def replayed(name: str) -> Archive:
            _, archive_id = ARCHIVE.parse_field(name, "name")
            return await self.get(caller, workspace_id, archive_id)

        return await create_once(request, self._s.earlier, make, replayed)

    async def _build(self, archive: Archive, owner: str) -> None:
        assert self._s.packer is not None
        hold = ""
        try:
            built = await self._s.packer.pack(archive, self._s.files, self._s.blobs)
            if built.size_bytes:
                hold = await self._s.accounting.hold(
                    archive.organization, owner, built.size_bytes, archive.name
                )
                await self._s.accounting.settle(hold, built.size_bytes)
            archive.state = ArchiveState.READY
            archive.size_bytes, archive.sha256 = built.size_bytes, built.sha256
            archive.file_count, archive.hold = built.file_count, hold
        except CorralError as exc:
            archive.state, archive.failure_reason = ArchiveState.FAILED, exc.reason
        except Exception:
            log.exception("archive build failed", extra={"archive": archive.name})
            archive.state, archive.failure_reason = ArchiveState.FAILED, "INTERNAL"
        archive.end_time = self._s.clock()
        async with self._s.uow() as uow:
            still = await uow.archives.get(archive.id) is not None
            if still:
                await uow.archives.save(archive)
            failed = not still or archive.state is ArchiveState.FAILED
            release = await self._s.accounting.release_later(
                uow, archive.organization, [hold] if failed else []
            )
            await uow.commit()
        release()
        if failed:
            await self._s.blobs.delete(archive.blob_key)

    async def get(self, caller: Caller, workspace_id: str, archive_id: str) -> Archive:
        await self._workspaces.get(caller, workspace_id)
        async with self._s.uow() as uow:
            found = await uow.archives.get(archive_id)
        if found is None or found.workspace_id != workspace_id:
            raise not_found(ARCHIVE.format(workspace_id, archive_id), "ARCHIVE_NOT_FOUND")
        return found

    async def list(
        self, caller: Caller, workspace_id: str, page: Page
    ) -> tuple[list[Archive], str]:
        await self._workspaces.get(caller, workspace_id)
        async with self._s.uow() as uow:
            rows = await uow.archives.list(workspace_id, page)
        return finish_page(rows, page, lambda a: (a.create_time, a.id))

    async def delete(self, caller: Caller, workspace_id: str, archive_id: str) -> None:
        await self._workspaces.for_write(caller, workspace_id)
        archive = await self.get(caller, workspace_id, archive_id)
        await self.remove(archive, caller, "storage.archives.delete")

    async def remove(self, archive: Archive, actor: Caller, action: str) -> None:
        async with self._s.uow() as uow:
            if not await uow.archives.delete(archive.id):
                return
            release = await self._s.accounting.release_later(
                uow, archive.organization, [archive.hold]
            )
            send = await self._s.audited(
                uow, actor, action, archive.name, organization=archive.organization
            )
            await uow.commit()
        send()
        release()
        await self._s.blobs.delete(archive.blob_key)

    async def content(
        self, caller: Caller, workspace_id: str, archive_id: str, offset: int
    ) -> tuple[Archive, AsyncIterator[bytes]]:
        archive = await self.get(caller, workspace_id, archive_id)
        if archive.state is not ArchiveState.READY:
            raise FailedPrecondition(
                f"the archive is {archive.state.value}",
                reason="ARCHIVE_NOT_READY",
                metadata={"state": archive.state.value},
            )
        if offset > archive.size_bytes:
            raise InvalidArgument(
                f"offset {offset} is past the end ({archive.size_bytes} bytes)",
                reason="RANGE_NOT_SATISFIABLE",
                violations=[FieldViolation("offset", f"must be at most {archive.size_bytes}")],
            )
        return archive, await self._s.blobs.get(archive.blob_key, offset=offset)
