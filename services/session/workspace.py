"""The session's workspace, which the storage service keeps: made with the session, copied
with a fork, deleted through the outbox.

CreateSession and ForkSession ask storage for the new session's workspace before they store the
session, and fail when storage cannot make it (the port says how: QUOTA_EXCEEDED,
WORKSPACE_UNAVAILABLE). Deleting one must not depend on storage answering: DeleteSession keeps
a ``workspace`` item (:mod:`corral.libs.outbox`) in the transaction that deletes the session,
tries it before it answers, and leaves it to the outbox's retries when storage is down. The
same item takes away what a failed CreateSession or ForkSession may have left in storage (a
lost answer can hide a workspace that was made). A workspace already gone counts as deleted.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from corral.libs.errors import NotFound, ResourceExhausted
from corral.libs.outbox import Outbox, OutboxItem
from corral.services.session.domain import Session, now
from corral.services.session.ports import WorkspaceStore

log = logging.getLogger("corral.session")

WORKSPACE = "workspace"


def delete_item(organization: str, workspace: str) -> OutboxItem:
    """Delete ``workspace`` (a name, ``workspaces/{id}``) in storage."""
    return OutboxItem(str(uuid.uuid4()), WORKSPACE, organization, {"delete": workspace}, now())


class Workspaces:
    """The session use cases' side of storage's workspaces (called as this service)."""

    def __init__(self, store: WorkspaceStore, outbox: Outbox) -> None:
        self._store = store
        self._outbox = outbox
        outbox.handle(WORKSPACE, self._deliver)

    async def _deliver(self, item: OutboxItem, token: str) -> None:
        await self._store.delete(item.payload["delete"])

    def created(self, session: Session) -> contextlib.AbstractAsyncContextManager[None]:
        """Storage makes ``session``'s empty workspace, on its owner's quota; then the block
        stores the session (see :meth:`_made`)."""

        async def make() -> str:
            return await self._store.create(
                organization=session.organization,
                session=session.name,
                owner=session.owner,
                request_id=str(uuid.uuid4()),
            )

        return self._made(session, make)

    def copied(
        self, parent: Session, child: Session
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """Storage copies ``parent``'s workspace for the fork ``child``, on the child's owner's
        quota (a parent whose workspace is gone, deleted in storage, gives an empty one); then
        the block stores the child."""

        async def copy() -> str:
            try:
                return await self._store.clone(
                    parent.workspace,
                    session=child.name,
                    owner=child.owner,
                    request_id=str(uuid.uuid4()),
                )
            except NotFound:
                log.warning(
                    "the forked session's workspace is gone; the fork starts with an empty one",
                    extra={"session": parent.name, "workspace": parent.workspace},
                )
            return await self._store.create(
                organization=child.organization,
                session=child.name,
                owner=child.owner,
                request_id=str(uuid.uuid4()),
            )

        return self._made(child, copy)

    @contextlib.asynccontextmanager
    async def _made(
        self, session: Session, make: Callable[[], Awaitable[str]]
    ) -> AsyncIterator[None]:
        """``make`` the workspace, then run the block that stores the session. When either
        fails, whatever storage may have made is deleted through the outbox: no workspace
        outlives a session that was never stored. A full quota made nothing."""
        try:
            session.workspace = await make()
        except ResourceExhausted:
            raise
        except BaseException:
            await self._discard(session)
            raise
        try:
            yield
        except BaseException:
            await self._discard(session)
            raise

    async def _discard(self, session: Session) -> None:
        item = delete_item(session.organization, session.workspace)
        try:
            await self._outbox.record(item, token="")
        except Exception:  # the database is down too: one attempt now, then it is left
            log.warning(
                "could not keep the deletion of an unused workspace; trying it once",
                extra={"workspace": session.workspace},
                exc_info=True,
            )
            with contextlib.suppress(Exception):
                await self._store.delete(session.workspace)

    def deletion(self, session: Session) -> OutboxItem | None:
        """The item that deletes a deleted session's workspace (None: it never had one), to
        keep in the transaction that deletes the session and pass to :meth:`delete_now`."""
        return delete_item(session.organization, session.workspace) if session.workspace else None

    async def delete_now(self, item: OutboxItem | None) -> None:
        """One attempt before the caller gets its answer; the outbox retries a failed one."""
        if item is not None:
            await self._outbox.deliver(item, token="")
