"""Retention, once across replicas: a round runs only on the replica that holds the ``sweeper``
lease (a row of ``leases``, taken with a conditional update, lapsing if its holder dies).

A round: expire abandoned uploads (their bytes discarded, their holds released), delete
expired reports, archives and workspaces (those of sessions deleted or archived past their
retention: the session service sets ``expire_time``), abort multipart uploads in the blob store
that no upload owns, measure every workspace and reconcile its quota holds (the agent writes
directly), empty the trash, and forget request ids past their retention.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field, replace
from datetime import timedelta

import sqlalchemy as sa

from corral.libs.auth.caller import SERVICE_ROLE, Caller
from corral.libs.idempotency import RETENTION_SECONDS
from corral.services.storage.base import Storage
from corral.services.storage.domain import UploadState
from corral.services.storage.reports import Archives, Reports
from corral.services.storage.uploads import Uploads
from corral.services.storage.workspaces import Workspaces

log = logging.getLogger("corral.storage.sweeper")

LEASE = "sweeper"
BATCH = 200
ENDED_UPLOADS_KEPT = timedelta(days=7)


def system(organization: str) -> Caller:
    """Who the audit log names for what retention does."""
    return Caller(
        subject="services/storage", organization=organization, roles=frozenset({SERVICE_ROLE})
    )


@dataclass
class Round:
    uploads_expired: int = 0
    reports_deleted: int = 0
    archives_deleted: int = 0
    workspaces_deleted: int = 0
    multipart_aborted: int = 0
    workspaces_measured: int = 0
    errors: list[str] = field(default_factory=list)


class Sweeper:
    def __init__(
        self,
        storage: Storage,
        workspaces: Workspaces,
        uploads: Uploads,
        reports: Reports,
        archives: Archives,
        *,
        interval_seconds: float = 60.0,
        lease_seconds: float = 300.0,
        replica: str | None = None,
    ) -> None:
        self._s = storage
        self._workspaces = workspaces
        self._uploads = uploads
        self._reports = reports
        self._archives = archives
        self._interval = interval_seconds
        self._lease = timedelta(seconds=lease_seconds)
        self.replica = replica or uuid.uuid4().hex

    async def lead(self) -> bool:
        """Whether this replica holds the lease now (taking or renewing it)."""
        at = self._s.clock()
        try:
            async with self._s.uow() as uow:
                mine = await uow.leases.take(LEASE, self.replica, at, at + self._lease)
                await uow.commit()
        except sa.exc.IntegrityError:
            return False  # another replica made the lease row first, and holds it
        return mine

    async def sweep(self) -> Round | None:
        """One round if this replica leads; None otherwise."""
        if not await self.lead():
            return None
        done = Round()
        for step in (
            self._expire_uploads,
            self._expire_reports,
            self._expire_archives,
            self._expire_workspaces,
            self._abort_orphans,
            self._measure,
            self._forget,
        ):
            try:
                await step(done)
            except Exception as exc:  # one failing step does not stop the others
                log.exception("sweeper step failed", extra={"step": step.__name__})
                done.errors.append(f"{step.__name__}: {exc!r}")
        return done

    async def _expire_uploads(self, done: Round) -> None:
        at = self._s.clock()
        async with self._s.uow() as uow:
            expired = await uow.uploads.expired(at, BATCH)
        for upload in expired:
            async with self._s.uow() as uow:
                mine = await uow.uploads.claim(upload.id, upload.version, at, at + self._lease)
                await uow.commit()
            if mine:
                claimed = replace(upload, version=upload.version + 1)
                await self._uploads.end(
                    claimed, UploadState.EXPIRED, "", system(upload.organization)
                )
                done.uploads_expired += 1

    async def _expire_reports(self, done: Round) -> None:
        async with self._s.uow() as uow:
            expired = await uow.reports.expired(self._s.clock(), BATCH)
        for report in expired:
            await self._reports.remove(
                report, system(report.organization), "storage.reports.expire"
            )
            done.reports_deleted += 1

    async def _expire_archives(self, done: Round) -> None:
        async with self._s.uow() as uow:
            expired = await uow.archives.expired(self._s.clock(), BATCH)
        for archive in expired:
            await self._archives.remove(
                archive, system(archive.organization), "storage.archives.expire"
            )
            done.archives_deleted += 1

    async def _expire_workspaces(self, done: Round) -> None:
        async with self._s.uow() as uow:
            ids = await uow.workspaces.ids(expired_before=self._s.clock(), limit=BATCH)
        for workspace_id in ids:
            async with self._s.uow() as uow:
                workspace = await uow.workspaces.get(workspace_id)
            if workspace is not None:
                await self._workspaces.remove(
                    workspace, system(workspace.organization), "storage.workspaces.expire"
                )
                done.workspaces_deleted += 1

    async def _abort_orphans(self, done: Round) -> None:
        """Multipart uploads older than an upload's lifetime that no ACTIVE upload owns."""
        cutoff = self._s.clock() - self._s.upload_lifetime
        async for staged in self._s.blobs.list_multipart("uploads/"):
            if staged.initiated > cutoff:
                continue
            upload_id = staged.key.removeprefix("uploads/")
            async with self._s.uow() as uow:
                upload = await uow.uploads.get(upload_id)
            if upload is None or upload.state is not UploadState.ACTIVE:
                await self._s.blobs.abort_multipart(staged.key, staged.upload_id)
                done.multipart_aborted += 1

    async def _measure(self, done: Round) -> None:
        after = ""
        while True:
            async with self._s.uow() as uow:
                ids = await uow.workspaces.ids(after=after, limit=BATCH)
            if not ids:
                return
            for workspace_id in ids:
                await self._s.accounting.reconcile(workspace_id)
                done.workspaces_measured += 1
            after = ids[-1]

    async def _forget(self, done: Round) -> None:
        at = self._s.clock()
        async with self._s.uow() as uow:
            await uow.idempotency.purge(at.timestamp() - RETENTION_SECONDS)
            old = await uow.uploads.ended_before(at - ENDED_UPLOADS_KEPT, BATCH)
            await uow.uploads.delete(old)
            await uow.commit()
        await self._s.files.empty_trash()

    async def run(self) -> None:
        """The background job: a round every interval on the leader (the outbox runs its own
        loop on every replica)."""
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.sweep()
            except Exception:
                log.exception("sweeper round failed")
