"""What the storage service needs from outside, as ports: identity's usage ledger and audit
log (adapters in ``adapters.py``), the blob store (``blobs.py``), and the archive packer.

Ports speak Python: an adapter turns its transport's failures into the categories of
:mod:`corral.libs.errors` before they reach the service layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from corral.services.storage.blobs import BlobStore
from corral.services.storage.domain import Archive
from corral.services.storage.workspace_fs import WorkspaceFiles


class StorageLedger(Protocol):
    """Identity's usage ledger, for USAGE_KIND_STORAGE_BYTES (a gauge: what is settled stays
    held until released)."""

    async def hold(
        self, *, organization: str, subject: str, amount: int, reference: str, request_id: str
    ) -> str:
        """Reserve ``amount`` bytes on ``subject``'s (and its organisation's) quota; the
        reservation's name. ResourceExhausted when a limit would be passed."""
        ...

    async def settle(self, reservation: str, amount: int) -> None:
        """Turn a hold into ``amount`` bytes in use (until released)."""
        ...

    async def record(
        self, *, organization: str, subject: str, amount: int, reference: str, request_id: str
    ) -> str:
        """``amount`` bytes in use whatever the limits (bytes an agent already wrote): a
        reservation of nothing, settled with ``amount``."""
        ...

    async def release(self, reservation: str) -> None:
        """Give back what a reservation holds; idempotent."""
        ...


@dataclass(frozen=True)
class BuiltArchive:
    size_bytes: int
    sha256: str
    file_count: int


class ArchivePacker(Protocol):
    """Packs a workspace (``archive.path_prefix`` of it) in ``archive.format`` into the blob
    ``archive.blob_key``, streaming, never holding it in memory. Raises a
    :mod:`corral.libs.errors` category (e.g. FailedPrecondition ``ARCHIVE_TOO_LARGE``) to fail
    the archive; the service records the outcome and the quota."""

    async def pack(
        self, archive: Archive, files: WorkspaceFiles, blobs: BlobStore
    ) -> BuiltArchive: ...
