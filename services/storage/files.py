"""File use cases: get, list (a directory view), write (one call), delete, move, download.

The workspace's directory is the truth: every call reads it (through ``WorkspaceFiles``, which
never follows a link). What the service knows beyond it (a file's sha256 and declared content
type) is kept per (size, mtime, inode) and used only while those still match.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

from corral.libs.auth.caller import Caller
from corral.libs.errors import FailedPrecondition, FieldViolation, InvalidArgument
from corral.libs.listing import Page, finish_page
from corral.services.storage.base import Storage, guess_content_type
from corral.services.storage.domain import Workspace
from corral.services.storage.paths import file_name
from corral.services.storage.workspace_fs import FileStat, OpenFile, file_changed
from corral.services.storage.workspaces import Workspaces

log = logging.getLogger("corral.storage")


@dataclass(frozen=True)
class FileInfo:
    workspace_id: str
    path: str
    size: int
    sha256: str  # "" when not known (listings)
    content_type: str
    update_time: datetime

    @property
    def name(self) -> str:
        return file_name(self.workspace_id, self.path)


@dataclass
class Download:
    """An opened file's metadata and the chunks of the range asked for."""

    file: FileInfo
    offset: int
    chunks: AsyncIterator[bytes]


def _mtime(stat: FileStat) -> datetime:
    return datetime.fromtimestamp(stat.mtime_ns / 1e9, UTC)


def workspace_full(limit: int) -> FailedPrecondition:
    return FailedPrecondition(
        f"the workspace would be larger than {limit} bytes",
        reason="WORKSPACE_FULL",
        metadata={"limit_bytes": str(limit)},
    )


def file_too_large(limit: int) -> FailedPrecondition:
    return FailedPrecondition(
        f"the file would be larger than {limit} bytes",
        reason="FILE_TOO_LARGE",
        metadata={"limit_bytes": str(limit)},
    )


class Files:
    def __init__(self, storage: Storage, workspaces: Workspaces) -> None:
        self._s = storage
        self._workspaces = workspaces

    def check_room(self, workspace: Workspace, size: int) -> None:
        """FILE_TOO_LARGE or WORKSPACE_FULL before accepting ``size`` more bytes."""
        limits = self._s.limits
        if size > limits.max_file_bytes:
            raise file_too_large(limits.max_file_bytes)
        if workspace.size_bytes + size > limits.max_workspace_bytes:
            raise workspace_full(limits.max_workspace_bytes)

    async def _info(self, workspace_id: str, opened: OpenFile) -> FileInfo:
        """The file's metadata, hashing it unless its digest is known for this content."""
        stat = opened.stat
        async with self._s.uow() as uow:
            known = await uow.workspaces.digest(workspace_id, stat.path)
        if known is not None and known[0] == stat.fingerprint:
            sha256, content_type = known[1], known[2]
        else:
            sha256 = await opened.sha256()
            content_type = known[2] if known else guess_content_type(stat.path)
            async with self._s.uow() as uow:
                await uow.workspaces.remember_digest(
                    workspace_id, stat.path, stat.fingerprint, sha256, content_type
                )
                await uow.commit()
        return FileInfo(workspace_id, stat.path, stat.size, sha256, content_type, _mtime(stat))

    async def get(self, caller: Caller, workspace_id: str, path: str) -> FileInfo:
        await self._workspaces.get(caller, workspace_id)
        opened = await self._s.files.open(workspace_id, path)
        try:
            return await self._info(workspace_id, opened)
        finally:
            opened.close()

    async def list(
        self, caller: Caller, workspace_id: str, *, prefix: str, delimiter: str, page: Page
    ) -> tuple[list[FileInfo], list[str], str]:
        await self._workspaces.get(caller, workspace_id)
        entries = await self._s.files.list(
            workspace_id,
            prefix,
            delimiter,
            start_after=str(page.after[0]) if page.after else "",
            limit=page.size + 1,
        )
        kept, token = finish_page(entries, page, lambda e: (e.key, ""))
        stats = [e.stat for e in kept if e.stat is not None]
        async with self._s.uow() as uow:
            known = await uow.workspaces.digests(workspace_id, [s.path for s in stats])
        files = []
        for stat in stats:
            fingerprint, sha256, content_type = known.get(stat.path, ("", "", ""))
            files.append(
                FileInfo(
                    workspace_id,
                    stat.path,
                    stat.size,
                    sha256 if fingerprint == stat.fingerprint else "",
                    content_type or guess_content_type(stat.path),
                    _mtime(stat),
                )
            )
        return files, [e.key for e in kept if e.stat is None], token

    async def write(
        self,
        caller: Caller,
        workspace_id: str,
        path: str,
        data: bytes,
        *,
        content_type: str,
        overwrite: bool,
        if_sha256: str,
    ) -> FileInfo:
        workspace = await self._workspaces.for_write(caller, workspace_id)
        self.check_room(workspace, len(data))
        hold = ""
        if data:
            hold = await self._s.accounting.hold(
                workspace.organization, workspace.owner, len(data), file_name(workspace_id, path)
            )

        async def content() -> AsyncIterator[bytes]:
            yield data

        try:
            stat, sha256 = await self._s.files.write(
                workspace_id,
                path,
                content(),
                overwrite=overwrite,
                max_bytes=self._s.limits.max_file_bytes,
                if_sha256=if_sha256,
            )
            if hold:
                await self._s.accounting.settle(hold, stat.size)
        except BaseException:
            await self._s.accounting.give_back(workspace.organization, [hold])
            raise
        info = FileInfo(
            workspace_id,
            path,
            stat.size,
            sha256,
            content_type or guess_content_type(path),
            _mtime(stat),
        )
        async with self._s.uow() as uow:
            if hold:
                await uow.workspaces.add_hold(workspace_id, hold, stat.size)
            await uow.workspaces.remember_digest(
                workspace_id, path, stat.fingerprint, sha256, info.content_type
            )
            send = await self._s.audited(
                uow,
                caller,
                "storage.files.write",
                info.name,
                {"path": path, "bytes": str(stat.size), "sha256": sha256},
                organization=workspace.organization,
            )
            await uow.commit()
        send()
        await self._s.accounting.reconcile(workspace_id)
        return info

    async def delete(self, caller: Caller, workspace_id: str, path: str, *, if_sha256: str) -> None:
        workspace = await self._workspaces.for_write(caller, workspace_id)
        stat = await self._s.files.delete(workspace_id, path, if_sha256)
        async with self._s.uow() as uow:
            await uow.workspaces.forget_digest(workspace_id, path)
            send = await self._s.audited(
                uow,
                caller,
                "storage.files.delete",
                file_name(workspace_id, path),
                {"path": path, "bytes": str(stat.size)},
                organization=workspace.organization,
            )
            await uow.commit()
        send()
        await self._s.accounting.reconcile(workspace_id)

    async def move(
        self, caller: Caller, workspace_id: str, source: str, target: str, *, overwrite: bool
    ) -> FileInfo:
        workspace = await self._workspaces.for_write(caller, workspace_id)
        if source == target:
            raise InvalidArgument(
                "the file is at that path already",
                violations=[FieldViolation("destination_path", "must differ from the file's")],
            )
        async with self._s.uow() as uow:
            known = await uow.workspaces.digest(workspace_id, source)
        stat = await self._s.files.move(workspace_id, source, target, overwrite=overwrite)
        async with self._s.uow() as uow:
            await uow.workspaces.forget_digest(workspace_id, source)
            await uow.workspaces.forget_digest(workspace_id, target)
            if known is not None and known[0] == stat.fingerprint:
                await uow.workspaces.remember_digest(
                    workspace_id, target, stat.fingerprint, known[1], known[2]
                )
            send = await self._s.audited(
                uow,
                caller,
                "storage.files.move",
                file_name(workspace_id, target),
                {"from": source, "to": target},
                organization=workspace.organization,
            )
            await uow.commit()
        send()
        if overwrite:
            await self._s.accounting.reconcile(workspace_id)
        opened = await self._s.files.open(workspace_id, target)
        try:
            return await self._info(workspace_id, opened)
        finally:
            opened.close()

    async def download(
        self,
        caller: Caller,
        workspace_id: str,
        path: str,
        *,
        offset: int,
        limit: int,
        if_sha256: str,
    ) -> Download:
        """The file as one opened copy (a rename or rewrite under it does not mix contents):
        its metadata and the chunks of ``[offset, offset + limit)``."""
        await self._workspaces.get(caller, workspace_id)
        opened = await self._s.files.open(workspace_id, path)
        try:
            info = await self._info(workspace_id, opened)
            if if_sha256 and if_sha256 != info.sha256:
                raise file_changed(path)
            if offset > info.size:
                raise InvalidArgument(
                    f"offset {offset} is past the end of the file ({info.size} bytes)",
                    reason="RANGE_NOT_SATISFIABLE",
                    violations=[FieldViolation("offset", f"must be at most {info.size}")],
                )
        except BaseException:
            opened.close()
            raise
        end = info.size if limit == 0 else min(info.size, offset + limit)

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for block in opened.read(offset, end):
                    yield block
            finally:
                opened.close()

        return Download(info, offset, chunks())
