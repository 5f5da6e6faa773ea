"""Storage bytes on identity's usage ledger (USAGE_KIND_STORAGE_BYTES, a gauge).

- Incoming bytes are *held* before they are accepted (an upload's declared size or each chunk,
  a report's content, a clone's size): a hold the quota cannot take refuses the write.
- A workspace's bytes are held by settled reservations recorded in ``workspace_holds``. Its
  owner's agent writes there directly, so storage *measures* the directory (after every change
  it makes, and on the sweeper's rounds) and reconciles: when the measurement differs from what
  is held, one new reservation records the measured bytes (a reservation of nothing settled with
  the real amount: work already done is recorded, limits or not) and the old ones are released.
- Reservations are released through the durable outbox (kind ``release``), written in the
  transaction that stops needing them, tried at once and retried by the outbox's loop, so a hold
  is never leaked by a crash or an identity outage.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime

from corral.libs.errors import ResourceExhausted
from corral.libs.outbox import Outbox, OutboxItem
from corral.services.storage.domain import Workspace, now
from corral.services.storage.ports import StorageLedger
from corral.services.storage.repository import StorageUnitOfWork
from corral.services.storage.workspace_fs import WorkspaceFiles

log = logging.getLogger("corral.storage.accounting")

RELEASE = "release"


def quota_exceeded(exc: ResourceExhausted) -> ResourceExhausted:
    """The ledger's refusal, as this service's reason (the QuotaFailure kept)."""
    return ResourceExhausted(
        "the storage quota cannot hold these bytes",
        reason="STORAGE_QUOTA_EXCEEDED",
        violations=exc.violations,
    )


class Accounting:
    def __init__(
        self,
        uow: Callable[[], StorageUnitOfWork],
        files: WorkspaceFiles,
        ledger: StorageLedger,
        outbox: Outbox,
        *,
        clock: Callable[[], datetime] = now,
    ) -> None:
        self._uow = uow
        self._files = files
        self._ledger = ledger
        self._outbox = outbox
        self._clock = clock

    async def hold(self, organization: str, subject: str, amount: int, reference: str) -> str:
        """Hold ``amount`` incoming bytes (STORAGE_QUOTA_EXCEEDED when they do not fit)."""
        try:
            return await self._ledger.hold(
                organization=organization,
                subject=subject,
                amount=amount,
                reference=reference,
                request_id=str(uuid.uuid4()),
            )
        except ResourceExhausted as exc:
            raise quota_exceeded(exc) from exc

    async def settle(self, reservation: str, amount: int) -> None:
        await self._ledger.settle(reservation, amount)

    async def reconcile(self, workspace_id: str) -> Workspace | None:
        """Measure the workspace and make what its owner's quota holds match; the workspace
        as measured (None if it is gone)."""
        size, count = await self._files.measure(workspace_id)
        async with self._uow() as uow:
            workspace = await uow.workspaces.get(workspace_id)
            holds = await uow.workspaces.holds(workspace_id)
        if workspace is None:
            return None
        at = self._clock()
        if sum(holds.values()) == size:
            async with self._uow() as uow:
                await uow.workspaces.measured(workspace_id, size, count, at, None)
                await uow.commit()
        else:
            await self._rebase(workspace, size, count, at)
        async with self._uow() as uow:
            return await uow.workspaces.get(workspace_id)

    async def _rebase(self, workspace: Workspace, size: int, count: int, at: datetime) -> None:
        recorded = ""
        if size:
            recorded = await self._ledger.record(
                organization=workspace.organization,
                subject=workspace.owner,
                amount=size,
                reference=workspace.name,
                request_id=str(uuid.uuid4()),
            )
        async with self._uow() as uow:
            mine = await uow.workspaces.measured(
                workspace.id, size, count, at, workspace.accounting_version
            )
            if mine:
                released = await uow.workspaces.drop_holds(workspace.id)
                if recorded:
                    await uow.workspaces.add_hold(workspace.id, recorded, size)
            else:  # a concurrent reconcile won: this one's record goes back
                released = [recorded]
            send = await self.release_later(uow, workspace.organization, released)
            await uow.commit()
        send()

    # -- releases, through the outbox ------------------------------------------------------------

    async def release_later(
        self, uow: StorageUnitOfWork, organization: str, reservations: Sequence[str]
    ) -> Callable[[], None]:
        """Keep the release of ``reservations`` in ``uow``'s transaction; returns what makes
        the first attempt, to call after the commit (the outbox retries what it leaves)."""
        items = [
            OutboxItem(str(uuid.uuid4()), RELEASE, organization, {"reservation": r}, self._clock())
            for r in reservations
            if r
        ]
        for item in items:
            await self._outbox.add(uow, item)

        def send() -> None:
            for item in items:
                self._outbox.send(item, token="")

        return send

    async def give_back(self, organization: str, reservations: Sequence[str]) -> None:
        """Release ``reservations`` in a transaction of their own (a write that failed)."""
        if any(reservations):
            async with self._uow() as uow:
                send = await self.release_later(uow, organization, reservations)
                await uow.commit()
            send()


def deliver_release(ledger: StorageLedger) -> Callable[[OutboxItem, str], Awaitable[None]]:
    """The outbox's handler of ledger releases."""

    async def release(item: OutboxItem, token: str) -> None:
        await ledger.release(item.payload["reservation"])

    return release
