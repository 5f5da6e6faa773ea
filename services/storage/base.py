"""What every storage use case stands on: the unit of work, the bytes (workspaces on the shared
filesystem, the blob store), the ledger, the audit outbox, limits and the clock."""

from __future__ import annotations

import asyncio
import logging
import mimetypes
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from corral.libs.audit import AUDIT, Audit, AuditWriter
from corral.libs.audit import deliver as deliver_audit
from corral.libs.auth.caller import Caller
from corral.libs.idempotency import CreateRequest
from corral.libs.outbox import Outbox
from corral.services.storage.accounting import RELEASE, Accounting, deliver_release
from corral.services.storage.blobs import BlobStore
from corral.services.storage.domain import UPLOAD_LIFETIME, now
from corral.services.storage.ports import ArchivePacker, StorageLedger
from corral.services.storage.repository import StorageUnitOfWork
from corral.services.storage.workspace_fs import WorkspaceFiles

log = logging.getLogger("corral.storage")

_TYPES = mimetypes.MimeTypes()  # Python's own table only: the same answer on every machine
DEFAULT_CONTENT_TYPE = "application/octet-stream"


def guess_content_type(path: str) -> str:
    return _TYPES.guess_type(path, strict=False)[0] or DEFAULT_CONTENT_TYPE


@dataclass(frozen=True)
class Limits:
    max_file_bytes: int = 5 * 1024**3
    max_workspace_bytes: int = 20 * 1024**3


@dataclass
class Storage:
    """The dependencies of the use cases; built once by the composition root."""

    uow: Callable[[], StorageUnitOfWork]
    files: WorkspaceFiles
    blobs: BlobStore
    ledger: StorageLedger
    audit_writer: AuditWriter
    limits: Limits
    packer: ArchivePacker | None = None
    clock: Callable[[], datetime] = now
    upload_lifetime: timedelta = UPLOAD_LIFETIME

    def __post_init__(self) -> None:
        # The kit's outbox, on this context's own ``outbox`` table.
        self.outbox = Outbox(self.uow, clock=self.clock)
        self.outbox.handle(AUDIT, deliver_audit(self.audit_writer))
        self.outbox.handle(RELEASE, deliver_release(self.ledger))
        self.audit = Audit(self.outbox, clock=self.clock)
        self.accounting = Accounting(
            self.uow, self.files, self.ledger, self.outbox, clock=self.clock
        )
        self._tasks: set[asyncio.Task[None]] = set()

    async def earlier(self, request: CreateRequest) -> str | None:
        """What an earlier create with ``request``'s request_id made (the idempotent-create
        flow's look-up, :func:`corral.libs.idempotency.create_once`)."""
        async with self.uow() as uow:
            return await request.earlier(uow.idempotency)

    async def audited(
        self,
        uow: StorageUnitOfWork,
        caller: Caller,
        action: str,
        resource: str,
        metadata: Mapping[str, str] | None = None,
        *,
        organization: str = "",
    ) -> Callable[[], None]:
        """Keep an audit entry in ``uow``'s transaction; returns what sends it after the
        commit (as this service: its writer never forwards the caller's token)."""
        entry = self.audit.entry(
            caller, action, resource, metadata, organization=organization or caller.organization
        )
        await self.audit.add(uow, entry)
        return lambda: self.audit.send(entry, token="")

    def background(self, job: Callable[[], Coroutine[Any, Any, object]]) -> None:
        """Run ``job()`` after the answer; failures are logged."""

        async def run() -> None:
            try:
                await job()
            except Exception:
                log.exception("storage background job failed")

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle_background(self) -> None:
        """Wait for the background jobs in flight (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self.outbox.settle()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self.outbox.close()
