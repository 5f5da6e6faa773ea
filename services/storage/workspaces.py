"""Workspace use cases: create (services), clone (services), get, list, update, delete."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa

from corral.libs.auth.caller import Caller
from corral.libs.errors import AlreadyExists, FieldViolation, InvalidArgument
from corral.libs.etags import check_etag, mismatch
from corral.libs.idempotency import CreateRequest, create_once
from corral.libs.listing import Condition, ListQuery, page_of
from corral.services.storage.base import Storage
from corral.services.storage.domain import (
    WORKSPACE,
    Upload,
    Workspace,
    authorize_delete,
    authorize_read,
    authorize_write,
    is_service,
    not_found,
    organization_of,
    require_service,
)

log = logging.getLogger("corral.storage")


def workspace_exists(name: str) -> AlreadyExists:
    return AlreadyExists(
        f"{name} exists already", reason="WORKSPACE_EXISTS", metadata={"name": name}
    )


def _owner_in(owner: str, organization: str, field: str) -> None:
    if organization_of(owner) != organization:
        raise InvalidArgument(
            f"{field} must be a user or service account of {organization}",
            violations=[
                FieldViolation(
                    field,
                    "must be organizations/{o}/users/{u} or .../serviceAccounts/{s} of the "
                    "workspace's organization",
                )
            ],
        )


def _may_set_expiry(caller: Caller) -> None:
    """A workspace lives and dies with its session (every workspace has one): only Corral
    services (the session service) set when it expires. A person who could would delete a
    live session's working directory under it."""
    if not is_service(caller):
        field = "workspace.expire_time"
        raise InvalidArgument(
            f"{field} is set by Corral services only",
            violations=[FieldViolation(field, "is set by Corral services only")],
        )


def visible_to(caller: Caller, query: ListQuery) -> ListQuery:
    """What a list may show: all of it to superusers and services, the organisation's to its
    admins and viewers, a user's own otherwise."""
    out = list(query.conditions)
    if caller.is_superuser or is_service(caller):
        return query
    out.append(Condition("organization", "=", caller.organization))
    if not caller.has_role("admin", "viewer"):
        out.append(Condition("owner", "=", caller.subject))
    return dataclasses.replace(query, conditions=out)


class Workspaces:
    def __init__(self, storage: Storage) -> None:
        self._s = storage

    async def _load(self, workspace_id: str) -> Workspace | None:
        async with self._s.uow() as uow:
            return await uow.workspaces.get(workspace_id)

    async def get(self, caller: Caller, workspace_id: str) -> Workspace:
        return authorize_read(
            caller, await self._load(workspace_id), WORKSPACE.format(workspace_id)
        )

    async def for_write(self, caller: Caller, workspace_id: str) -> Workspace:
        return authorize_write(
            caller, await self._load(workspace_id), WORKSPACE.format(workspace_id)
        )

    async def list(self, caller: Caller, query: ListQuery) -> tuple[list[Workspace], str]:
        async with self._s.uow() as uow:
            rows = await uow.workspaces.list(visible_to(caller, query))
        return page_of(rows, query)

    # -- create and clone (internal) -------------------------------------------------------------

    async def create(
        self,
        caller: Caller,
        *,
        organization: str,
        session_id: str,
        owner: str,
        labels: dict[str, str],
        expire_time: datetime | None,
        request_id: str,
    ) -> Workspace:
        require_service(caller)
        _owner_in(owner, organization, "workspace.owner")
        payload = [organization, session_id, owner, sorted(labels.items()), expire_time]
        request = CreateRequest.of("CreateWorkspace", caller.subject, request_id, payload)

        async def make(request: CreateRequest) -> Workspace:
            name = WORKSPACE.format(session_id)
            if await self._load(session_id) is not None:
                raise workspace_exists(name)
            await self._room_for(organization, owner, name)
            await self._s.files.create(session_id)  # a leftover of a failed attempt is reused
            at = self._s.clock()
            workspace = Workspace(
                id=session_id,
                organization=organization,
                session=f"sessions/{session_id}",
                owner=owner,
                labels=labels,
                create_time=at,
                update_time=at,
                expire_time=expire_time,
                measure_time=at,
            )
            async with self._s.uow() as uow:
                await request.remember(uow.idempotency, name, at.timestamp())
                try:
                    await uow.workspaces.add(workspace)
                except sa.exc.IntegrityError as exc:
                    raise workspace_exists(name) from exc
                send = await self._s.audited(
                    uow, caller, "storage.workspaces.create", name, organization=organization
                )
                await uow.commit()
            send()
            return workspace

        return await create_once(request, self._s.earlier, make, self._replayed)

    async def _room_for(self, organization: str, owner: str, name: str) -> None:
        """STORAGE_QUOTA_EXCEEDED when the owner's or the organisation's storage quota has no
        byte left (a session there could not keep a file): one byte is held and given back."""
        probe = await self._s.accounting.hold(organization, owner, 1, name)
        try:
            await self._s.ledger.release(probe)
        except Exception:
            await self._s.accounting.give_back(organization, [probe])  # the outbox retries it

    async def _replayed(self, name: str) -> Workspace:
        (workspace_id,) = WORKSPACE.parse_field(name, "name")
        found = await self._load(workspace_id)
        if found is None:
            raise not_found(name, "WORKSPACE_NOT_FOUND")
        return found

    async def clone(
        self,
        caller: Caller,
        source_id: str,
        *,
        session_id: str,
        owner: str,
        labels: dict[str, str] | None,
        request_id: str,
    ) -> Workspace:
        require_service(caller)
        source = authorize_read(caller, await self._load(source_id), WORKSPACE.format(source_id))
        _owner_in(owner, source.organization, "owner")
        payload = [source_id, session_id, owner, sorted((labels or {}).items())]
        request = CreateRequest.of("CloneWorkspace", caller.subject, request_id, payload)

        async def make(request: CreateRequest) -> Workspace:
            name = WORKSPACE.format(session_id)
            if await self._load(session_id) is not None:
                raise workspace_exists(name)
            size, _ = await self._s.files.measure(source_id)
            hold = ""
            if size:
                hold = await self._s.accounting.hold(source.organization, owner, size, name)
            try:
                return await self._copy(caller, request, source, session_id, owner, labels, hold)
            except BaseException:
                await self._s.accounting.give_back(source.organization, [hold])
                raise

        return await create_once(request, self._s.earlier, make, self._replayed)

    async def _copy(
        self,
        caller: Caller,
        request: CreateRequest,
        source: Workspace,
        session_id: str,
        owner: str,
        labels: dict[str, str] | None,
        hold: str,
    ) -> Workspace:
        name = WORKSPACE.format(session_id)
        if not await self._s.files.clone(source.id, session_id):
            raise workspace_exists(name)
        size, count = await self._s.files.measure(session_id)
        try:
            if hold:
                await self._s.accounting.settle(hold, size)
            at = self._s.clock()
            workspace = Workspace(
                id=session_id,
                organization=source.organization,
                session=f"sessions/{session_id}",
                owner=owner,
                labels=dict(source.labels if labels is None else labels),
                create_time=at,
                update_time=at,
                source_workspace=source.name,
                size_bytes=size,
                file_count=count,
                measure_time=at,
            )
            async with self._s.uow() as uow:
                await request.remember(uow.idempotency, name, at.timestamp())
                await uow.workspaces.add(workspace)
                if hold:
                    await uow.workspaces.add_hold(session_id, hold, size)
                send = await self._s.audited(
                    uow,
                    caller,
                    "storage.workspaces.clone",
                    name,
                    {"source": source.name, "bytes": str(size)},
                    organization=source.organization,
                )
                await uow.commit()
        except BaseException:
            await self._s.files.discard(session_id)
            raise
        send()
        return workspace

    # -- update and delete -----------------------------------------------------------------------

    async def update(
        self,
        caller: Caller,
        workspace_id: str,
        *,
        etag: str,
        paths: frozenset[str],
        labels: dict[str, str],
        expire_time: datetime | None,
    ) -> Workspace:
        name = WORKSPACE.format(workspace_id)
        async with self._s.uow() as uow:
            workspace = authorize_write(caller, await uow.workspaces.get(workspace_id), name)
            check_etag(etag, workspace.etag, "workspace")
            expected = workspace.version
            if "labels" in paths:
                workspace.labels = labels
            if "expire_time" in paths and expire_time != workspace.expire_time:
                _may_set_expiry(caller)
                workspace.expire_time = expire_time
            workspace.version += 1
            workspace.update_time = self._s.clock()
            if not await uow.workspaces.save(workspace, expected):
                raise mismatch("workspace")
            send = await self._s.audited(
                uow,
                caller,
                "storage.workspaces.update",
                name,
                {"fields": ",".join(sorted(paths))},
                organization=workspace.organization,
            )
            await uow.commit()
        send()
        return workspace

    async def delete(self, caller: Caller, workspace_id: str, *, etag: str) -> None:
        name = WORKSPACE.format(workspace_id)
        workspace = authorize_delete(caller, await self._load(workspace_id), name)
        check_etag(etag, workspace.etag, "workspace")
        await self.remove(workspace, caller, "storage.workspaces.delete")

    async def remove(self, workspace: Workspace, actor: Caller, action: str) -> None:
        """Take a workspace away with its uploads and archives, and give its bytes back (the
        user's delete and the sweeper's expiry alike)."""
        await self._s.files.discard(workspace.id)  # gone for the agent and the API at once
        async with self._s.uow() as uow:
            uploads = await uow.uploads.in_workspace(workspace.id)
            archives = await uow.archives.in_workspace(workspace.id)
            released = await uow.workspaces.drop_holds(workspace.id)
            released += [h for u in uploads for h in u.holds] + [a.hold for a in archives]
            await uow.workspaces.delete(workspace.id)
            await uow.uploads.delete([u.id for u in uploads])
            for archive in archives:
                await uow.archives.delete(archive.id)
            release = await self._s.accounting.release_later(uow, workspace.organization, released)
            send = await self._s.audited(
                uow, actor, action, workspace.name, organization=workspace.organization
            )
            await uow.commit()
        send()
        release()
        active = [u for u in uploads if u.multipart_id]
        self._s.background(lambda: self._drop_blobs(active, [a.blob_key for a in archives]))
        self._s.background(self._s.files.empty_trash)

    async def _drop_blobs(self, uploads: Sequence[Upload], keys: Sequence[str]) -> None:
        for upload in uploads:
            await discard_staged(self._s, upload)
        for key in keys:
            await self._s.blobs.delete(key)


async def discard_staged(storage: Storage, upload: Upload) -> None:
    """Remove what an upload left in the blob store (its parts, chunks and assembled copy)."""
    with contextlib.suppress(Exception):
        await storage.blobs.abort_multipart(upload.blob_key, upload.multipart_id)
    for chunk in upload.pending:
        await storage.blobs.delete(chunk.key)
    await storage.blobs.delete(upload.blob_key)
