"""The storage service layer, put together: one object per group of use cases, on one
:class:`~corral.services.storage.base.Storage`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from corral.libs.auth.caller import Caller
from corral.services.storage.base import Storage
from corral.services.storage.domain import USAGE, StorageBytes, authorize_usage
from corral.services.storage.files import Files
from corral.services.storage.reports import Archives, Reports
from corral.services.storage.sweeper import Sweeper
from corral.services.storage.uploads import Uploads
from corral.services.storage.workspaces import Workspaces


@dataclass(frozen=True)
class UsageFigures:
    organization: str
    total: StorageBytes
    owners: list[tuple[str, StorageBytes]]  # largest first
    compute_time: datetime

    @property
    def name(self) -> str:
        return USAGE.format(self.organization.removeprefix("organizations/"))


class Usage:
    def __init__(self, storage: Storage) -> None:
        self._s = storage

    async def get(self, caller: Caller, organization: str) -> UsageFigures:
        name = f"{organization}/storageUsage"
        everyone = authorize_usage(caller, organization, name)
        async with self._s.uow() as uow:
            lines = await uow.usage.by_owner(organization)
        total = StorageBytes()
        for figures in lines.values():
            total.add(figures)
        shown = lines if everyone else {k: v for k, v in lines.items() if k == caller.subject}
        owners = sorted(shown.items(), key=lambda item: (-item[1].total_bytes, item[0]))
        return UsageFigures(organization, total, owners, self._s.clock())


class StorageService:
    def __init__(
        self,
        storage: Storage,
        *,
        sweep_interval_seconds: float = 60.0,
        sweep_lease_seconds: float = 300.0,
        replica: str | None = None,
    ) -> None:
        self.storage = storage
        self.workspaces = Workspaces(storage)
        self.files = Files(storage, self.workspaces)
        self.uploads = Uploads(storage, self.workspaces, self.files)
        self.reports = Reports(storage)
        self.archives = Archives(storage, self.workspaces)
        self.usage = Usage(storage)
        self.sweeper = Sweeper(
            storage,
            self.workspaces,
            self.uploads,
            self.reports,
            self.archives,
            interval_seconds=sweep_interval_seconds,
            lease_seconds=sweep_lease_seconds,
            replica=replica,
        )

    async def settle(self) -> None:
        """Wait for background work in flight (tests, shutdown)."""
        await self.storage.settle_background()

    async def close(self) -> None:
        await self.storage.close()
