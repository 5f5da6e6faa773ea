"""Resumable uploads: create, append at an offset, commit with the sha256, abort, expire.

The bytes wait in the blob store as a multipart upload (``uploads/<id>``): a chunk becomes a
part once there are enough bytes for one (the store's minimum part size; smaller chunks wait as
blobs of their own until then). The commit joins the parts, checks the sha256 the store computed
while joining, and streams the object into the workspace, where the file appears atomically.

One append or commit of an upload runs at a time, across replicas: each *claims* the upload
(a conditional update of its row, lapsing after ``CLAIM``), and a second gets UPLOAD_BUSY.
Quota: the workspace owner's bytes are held before they are accepted (the declared size at
create, else each chunk as it comes); a refused hold ends the upload FAILED with everything
staged discarded and every hold given back. At commit the first hold is settled with the file's
size and becomes one of the workspace's holds; the others are released.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta

from corral.libs.auth.caller import Caller
from corral.libs.errors import (
    Aborted,
    CorralError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
)
from corral.libs.idempotency import CreateRequest, create_once
from corral.libs.names import new_id
from corral.services.storage.base import Storage, guess_content_type
from corral.services.storage.blobs import PartInfo
from corral.services.storage.domain import (
    UPLOAD,
    PendingChunk,
    StagedPart,
    Upload,
    UploadState,
    Workspace,
    authorize_upload,
)
from corral.services.storage.files import FileInfo, Files, file_too_large
from corral.services.storage.paths import file_name
from corral.services.storage.workspace_fs import file_exists
from corral.services.storage.workspaces import Workspaces, discard_staged

log = logging.getLogger("corral.storage")

CLAIM = timedelta(seconds=120)
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def busy() -> Aborted:
    return Aborted(
        "another chunk or the commit of this upload is in progress", reason="UPLOAD_BUSY"
    )


class Uploads:
    def __init__(self, storage: Storage, workspaces: Workspaces, files: Files) -> None:
        self._s = storage
        self._workspaces = workspaces
        self._files = files

    async def _load(
        self, caller: Caller, workspace_id: str, upload_id: str, *, drive: bool
    ) -> tuple[Upload, Workspace]:
        async with self._s.uow() as uow:
            upload = await uow.uploads.get(upload_id)
            workspace = await uow.workspaces.get(workspace_id)
        if upload is not None and upload.workspace_id != workspace_id:
            upload = None
        return authorize_upload(
            caller, upload, workspace, UPLOAD.format(workspace_id, upload_id), drive=drive
        )

    async def get(self, caller: Caller, workspace_id: str, upload_id: str) -> Upload:
        upload, _ = await self._load(caller, workspace_id, upload_id, drive=False)
        if upload.expired(self._s.clock()):
            upload = replace(upload, state=UploadState.EXPIRED)
        return upload

    # -- create ----------------------------------------------------------------------------------

    async def create(
        self,
        caller: Caller,
        workspace_id: str,
        *,
        path: str,
        size: int,
        content_type: str,
        overwrite: bool,
        request_id: str,
    ) -> Upload:
        workspace = await self._workspaces.for_write(caller, workspace_id)
        self._files.check_room(workspace, size)
        if not overwrite and await self._s.files.stat(workspace_id, path) is not None:
            raise file_exists(path)
        payload = [workspace_id, path, size, content_type, overwrite]
        request = CreateRequest.of("CreateUpload", caller.subject, request_id, payload)

        async def make(request: CreateRequest) -> Upload:
            upload_id = new_id()
            name = UPLOAD.format(workspace_id, upload_id)
            holds = []
            if size:
                holds.append(
                    await self._s.accounting.hold(
                        workspace.organization, workspace.owner, size, name
                    )
                )
            key = f"uploads/{upload_id}"
            try:
                multipart_id = await self._s.blobs.begin_multipart(key)
                at = self._s.clock()
                upload = Upload(
                    id=upload_id,
                    workspace_id=workspace_id,
                    organization=workspace.organization,
                    path=path,
                    declared_size=size,
                    content_type=content_type or guess_content_type(path),
                    overwrite=overwrite,
                    creator=caller.subject,
                    charged_to=workspace.owner,
                    create_time=at,
                    update_time=at,
                    expire_time=at + self._s.upload_lifetime,
                    blob_key=key,
                    multipart_id=multipart_id,
                    holds=holds,
                    held_bytes=size,
                )
                async with self._s.uow() as uow:
                    await request.remember(uow.idempotency, name, at.timestamp())
                    await uow.uploads.add(upload)
                    send = await self._s.audited(
                        uow,
                        caller,
                        "storage.uploads.create",
                        name,
                        {"path": path, "size_bytes": str(size)},
                        organization=workspace.organization,
                    )
                    await uow.commit()
            except BaseException:
                await self._s.accounting.give_back(workspace.organization, holds)
                raise
            send()
            return upload

        async def replayed(name: str) -> Upload:
            _, upload_id = UPLOAD.parse_field(name, "name")
            return await self.get(caller, workspace_id, upload_id)

        return await create_once(request, self._s.earlier, make, replayed)

    # -- append ----------------------------------------------------------------------------------

    async def _claim(self, upload: Upload) -> Upload:
        at = self._s.clock()
        async with self._s.uow() as uow:
            mine = await uow.uploads.claim(upload.id, upload.version, at, at + CLAIM)
            await uow.commit()
        if not mine:
            raise busy()
        return replace(upload, version=upload.version + 1, busy_until=at + CLAIM)

    async def _unclaim(self, upload: Upload) -> None:
        async with self._s.uow() as uow:
            current = await uow.uploads.get(upload.id)
            if current is not None and current.version == upload.version:
                current.busy_until = None
                current.version += 1
                await uow.uploads.save(current, upload.version)
            await uow.commit()

    async def append(
        self, caller: Caller, workspace_id: str, upload_id: str, *, offset: int, data: bytes
    ) -> int:
        upload, workspace = await self._load(caller, workspace_id, upload_id, drive=True)
        upload.require_active(self._s.clock())
        end = offset + len(data)
        if offset < upload.committed_bytes and end == upload.committed_bytes:
            return upload.committed_bytes  # a retried chunk whose answer was lost
        if offset != upload.committed_bytes:
            raise FailedPrecondition(
                f"the upload continues at byte {upload.committed_bytes}, not {offset}",
                reason="OFFSET_MISMATCH",
                metadata={"committed_bytes": str(upload.committed_bytes)},
            )
        if upload.declared_size and end > upload.declared_size:
            raise InvalidArgument(
                f"the upload was declared as {upload.declared_size} bytes",
                reason="SIZE_MISMATCH",
                violations=[FieldViolation("data", "goes past the declared size_bytes")],
            )
        upload = await self._claim(upload)
        try:
            if end > self._s.limits.max_file_bytes:
                raise file_too_large(self._s.limits.max_file_bytes)
            if end > upload.held_bytes:
                self._files.check_room(workspace, end)
                upload.holds.append(
                    await self._s.accounting.hold(
                        workspace.organization,
                        upload.charged_to,
                        end - upload.held_bytes,
                        upload.name,
                    )
                )
                upload.held_bytes = end
            await self._stage(upload, data)
        except CorralError as exc:
            if exc.reason in {"STORAGE_QUOTA_EXCEEDED", "FILE_TOO_LARGE", "WORKSPACE_FULL"}:
                await self.end(upload, UploadState.FAILED, exc.reason, caller)
            else:
                await self._keep_holds(upload)
            raise
        except BaseException:
            await self._keep_holds(upload)
            raise
        upload.committed_bytes = end
        at = self._s.clock()
        upload.update_time, upload.expire_time = at, at + self._s.upload_lifetime
        await self._save(upload)
        return end

    async def _keep_holds(self, upload: Upload) -> None:
        """An append that failed midway: record the holds it took, free the claim."""
        async with self._s.uow() as uow:
            current = await uow.uploads.get(upload.id)
            if current is not None and current.version == upload.version:
                current.holds, current.held_bytes = upload.holds, upload.held_bytes
                current.busy_until = None
                current.version += 1
                await uow.uploads.save(current, upload.version)
            await uow.commit()

    async def _save(self, upload: Upload) -> None:
        expected = upload.version
        upload.busy_until = None
        upload.version += 1
        async with self._s.uow() as uow:
            if not await uow.uploads.save(upload, expected):
                raise busy()
            await uow.commit()

    async def _stage(self, upload: Upload, data: bytes) -> None:
        """Keep ``data``: as a part of its own when big enough, else pending until the pending
        bytes make a part."""
        blobs = self._s.blobs
        if not upload.pending and len(data) >= blobs.min_part_size:
            await self._put_part(upload, _once(data))
            return
        key = f"{upload.blob_key}-pending/{upload.committed_bytes:020d}-{new_id()[:8]}"
        await blobs.put(key, _once(data))
        upload.pending.append(PendingChunk(key, len(data)))
        if upload.pending_bytes >= blobs.min_part_size:
            await self._flush(upload)

    async def _flush(self, upload: Upload) -> None:
        """Make the pending chunks one part (the last part may be small)."""
        pending = list(upload.pending)

        async def joined() -> AsyncIterator[bytes]:
            for chunk in pending:
                async for block in await self._s.blobs.get(chunk.key):
                    yield block

        await self._put_part(upload, joined())
        upload.pending = []
        for chunk in pending:
            await self._s.blobs.delete(chunk.key)

    async def _put_part(self, upload: Upload, chunks: AsyncIterator[bytes]) -> None:
        number = len(upload.parts) + 1
        part = await self._s.blobs.put_part(upload.blob_key, upload.multipart_id, number, chunks)
        upload.parts.append(StagedPart(part.number, part.size, part.etag))

    # -- commit, abort, end ----------------------------------------------------------------------

    async def commit(
        self, caller: Caller, workspace_id: str, upload_id: str, *, sha256: str
    ) -> FileInfo:
        upload, workspace = await self._load(caller, workspace_id, upload_id, drive=True)
        if upload.state is UploadState.COMMITTED and upload.sha256 == sha256:
            return await self._files.get(caller, workspace_id, upload.path)
        upload.require_active(self._s.clock())
        if not upload.overwrite and await self._s.files.stat(workspace_id, upload.path):
            raise file_exists(upload.path)  # still ACTIVE: move the file away and commit again
        upload = await self._claim(upload)
        try:
            if upload.declared_size and upload.committed_bytes != upload.declared_size:
                raise InvalidArgument(
                    f"{upload.committed_bytes} bytes arrived; {upload.declared_size} declared",
                    reason="SIZE_MISMATCH",
                    violations=[FieldViolation("sha256", "the upload is incomplete")],
                )
            if upload.pending or not upload.parts:
                if upload.pending:
                    await self._flush(upload)
                else:
                    await self._put_part(upload, _once(b""))
            joined = await self._s.blobs.complete_multipart(
                upload.blob_key,
                upload.multipart_id,
                [PartInfo(p.number, p.size, p.etag) for p in upload.parts],
            )
            if joined.sha256 != sha256:
                raise InvalidArgument(
                    "the sha256 does not match the bytes received",
                    reason="CHECKSUM_MISMATCH",
                    violations=[
                        FieldViolation("sha256", f"the bytes received have {joined.sha256}")
                    ],
                )
            stat, written = await self._s.files.write(
                workspace_id,
                upload.path,
                await self._s.blobs.get(upload.blob_key),
                overwrite=upload.overwrite,
                max_bytes=self._s.limits.max_file_bytes,
            )
            if written != sha256:  # the blob store lost or changed bytes: never keep them
                raise InvalidArgument("the stored bytes changed", reason="CHECKSUM_MISMATCH")
            hold, extra = (upload.holds[0], upload.holds[1:]) if upload.holds else ("", [])
            if hold:
                await self._s.accounting.settle(hold, stat.size)
        except CorralError as exc:
            await self.end(upload, UploadState.FAILED, exc.reason, caller)
            raise
        except BaseException:
            await self._unclaim(upload)
            raise
        name = file_name(workspace_id, upload.path)
        async with self._s.uow() as uow:
            upload.state, upload.sha256 = UploadState.COMMITTED, sha256
            upload.update_time, upload.busy_until = self._s.clock(), None
            upload.version += 1
            await uow.uploads.save(upload, upload.version - 1)
            if hold:
                await uow.workspaces.add_hold(workspace_id, hold, stat.size)
            await uow.workspaces.remember_digest(
                workspace_id, upload.path, stat.fingerprint, sha256, upload.content_type
            )
            release = await self._s.accounting.release_later(uow, upload.organization, extra)
            send = await self._s.audited(
                uow,
                caller,
                "storage.uploads.commit",
                name,
                {"upload": upload.name, "bytes": str(stat.size), "sha256": sha256},
                organization=workspace.organization,
            )
            await uow.commit()
        send()
        release()
        self._s.background(lambda: self._s.blobs.delete(upload.blob_key))
        await self._s.accounting.reconcile(workspace_id)
        return await self._files.get(caller, workspace_id, upload.path)

    async def abort(self, caller: Caller, workspace_id: str, upload_id: str) -> Upload:
        upload, _ = await self._load(caller, workspace_id, upload_id, drive=False)
        if upload.state is UploadState.COMMITTED:
            raise FailedPrecondition(
                "the upload was committed",
                reason="UPLOAD_NOT_ACTIVE",
                metadata={"state": upload.state.value},
            )
        if upload.state is not UploadState.ACTIVE:
            return upload
        upload = await self._claim(upload)
        return await self.end(upload, UploadState.ABORTED, "", caller)

    async def end(self, upload: Upload, state: UploadState, reason: str, actor: Caller) -> Upload:
        """End a claimed (or expired) upload without a file: discard what it staged and give
        back its holds."""
        await discard_staged(self._s, upload)
        released = list(upload.holds)
        expected = upload.version
        upload.state, upload.failure_reason = state, reason
        upload.update_time, upload.busy_until = self._s.clock(), None
        upload.holds, upload.held_bytes, upload.pending = [], 0, []
        upload.version += 1
        async with self._s.uow() as uow:
            if not await uow.uploads.save(upload, expected):
                raise busy()
            release = await self._s.accounting.release_later(uow, upload.organization, released)
            send = await self._s.audited(
                uow,
                actor,
                f"storage.uploads.{state.value.lower()}",
                upload.name,
                {"reason": reason} if reason else {},
                organization=upload.organization,
            )
            await uow.commit()
        send()
        release()
        return upload


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data
