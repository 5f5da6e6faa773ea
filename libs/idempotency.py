"""Idempotent creates by ``request_id`` (AIP-155): one mechanism for every service.

A create that carries a ``request_id`` records, in the same transaction as the resource it
makes, the request's fingerprint and its result (the created resource's name). A retry with
the same ``request_id`` and the same payload gets that result again (the use case re-reads the
resource and answers as the first call did); the same ``request_id`` with a different payload
fails ``INVALID_ARGUMENT`` with reason ``REQUEST_ID_REUSED``.

- Keys are scoped by method and caller (:func:`scope`): one caller's ``request_id`` never
  answers for another's.
- Records are kept for :data:`RETENTION` (24 hours, as the protos document); an older record
  is ignored, and :meth:`SqlIdempotencyStore.purge` deletes them (identity's housekeeping and
  session's maintenance call it).
- Two concurrent requests with one ``request_id``: the second insert violates the primary key
  (:class:`RequestRaced`), its transaction fails, and :func:`create_once` answers with the
  first one's result.

Each service owns its own table, made by :func:`idempotency_table` in its own metadata.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from corral.libs.errors import Aborted, InvalidArgument

T = TypeVar("T")

RETENTION_SECONDS = 24 * 3600


@dataclass(frozen=True)
class Record:
    fingerprint: str
    result: str
    create_time: float


class IdempotencyStore(Protocol):
    async def get(self, scope: str, request_id: str) -> Record | None: ...

    async def put(
        self, scope: str, request_id: str, fingerprint: str, result: str, at: float
    ) -> None: ...

    async def purge(self, before: float) -> int: ...


def scope(method: str, caller: str) -> str:
    """The key space of one method for one caller (a principal's subject)."""
    return f"{method}:{caller}"


def fingerprint(payload: Any) -> str:
    """A stable digest of a request's payload (everything but the ``request_id``): a protobuf
    message (deterministic serialisation), bytes, or anything JSON can encode."""
    if hasattr(payload, "SerializeToString"):
        raw: bytes = payload.SerializeToString(deterministic=True)
    elif isinstance(payload, bytes):
        raw = payload
    else:
        raw = json.dumps(payload, sort_keys=True, default=_encode).encode()
    return hashlib.sha256(raw).hexdigest()


def _encode(value: Any) -> Any:
    if hasattr(value, "SerializeToString"):
        return value.SerializeToString(deterministic=True).hex()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


class RequestRaced(Aborted):
    """Another request with the same key committed first; :func:`create_once` answers with
    its result. Should it reach a client, ABORTED says: retry."""

    def __init__(self, request_id: str) -> None:
        super().__init__(
            "a concurrent request with this request_id was being made; retry",
            metadata={"request_id": request_id},
        )


async def replay(
    store: IdempotencyStore,
    scope_: str,
    request_id: str,
    fingerprint_: str,
    *,
    now: float | None = None,
) -> str | None:
    """The result of an earlier request with this ``request_id``, or None if there is none
    (or no ``request_id``). Raises REQUEST_ID_REUSED when that request had another payload."""
    if not request_id:
        return None
    found = await store.get(scope_, request_id)
    current = time.time() if now is None else now
    if found is None or found.create_time < current - RETENTION_SECONDS:
        return None
    if found.fingerprint != fingerprint_:
        raise InvalidArgument(
            "this request_id was already used for a different request",
            reason="REQUEST_ID_REUSED",
            metadata={"request_id": request_id},
        )
    return found.result


@dataclass(frozen=True)
class CreateRequest:
    """One create under idempotency: its key (scope, request_id) and its payload's
    fingerprint."""

    scope: str
    request_id: str
    fingerprint: str

    @classmethod
    def of(cls, method: str, caller: str, request_id: str, payload: Any) -> CreateRequest:
        return cls(scope(method, caller), request_id, fingerprint(payload))

    async def earlier(self, store: IdempotencyStore, *, now: float | None = None) -> str | None:
        """What an earlier request with this key created (see :func:`replay`)."""
        return await replay(store, self.scope, self.request_id, self.fingerprint, now=now)

    async def remember(self, store: IdempotencyStore, result: str, at: float) -> None:
        """Record the created resource's name, in the transaction that creates it."""
        if self.request_id:
            await store.put(self.scope, self.request_id, self.fingerprint, result, at)


async def create_once(
    request: CreateRequest,
    earlier: Callable[[CreateRequest], Awaitable[str | None]],
    create: Callable[[CreateRequest], Awaitable[T]],
    replayed: Callable[[str], Awaitable[T]],
    *,
    races: tuple[type[Exception], ...] = (),
) -> T:
    """The one idempotent-create flow: ``replayed(name)`` of what an earlier request made,
    else ``create(request)`` (which calls :meth:`CreateRequest.remember` in its transaction).
    When a concurrent twin commits first (:class:`RequestRaced`, or one of ``races``, e.g. the
    resource's own unique key), its result is looked up once more and answered with."""
    found = await earlier(request)
    if found is not None:
        return await replayed(found)
    caught: tuple[type[Exception], ...] = (RequestRaced, *races)
    try:
        return await create(request)
    except caught:
        found = await earlier(request)
        if found is None:
            raise
        return await replayed(found)


def idempotency_table(metadata: sa.MetaData, name: str = "idempotency_keys") -> sa.Table:
    return sa.Table(
        name,
        metadata,
        sa.Column("scope", sa.String(200), primary_key=True),
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("result", sa.String(300), nullable=False),
        sa.Column("create_time", sa.Float, nullable=False, index=True),
    )


class SqlIdempotencyStore:
    """The store on one service's table, inside that service's unit of work."""

    def __init__(self, connection: AsyncConnection, table: sa.Table) -> None:
        self._c = connection
        self._t = table

    async def get(self, scope: str, request_id: str) -> Record | None:
        t = self._t
        row = (
            await self._c.execute(
                sa.select(t.c.fingerprint, t.c.result, t.c.create_time).where(
                    t.c.scope == scope, t.c.request_id == request_id
                )
            )
        ).first()
        return None if row is None else Record(row[0], row[1], float(row[2]))

    async def put(
        self, scope: str, request_id: str, fingerprint: str, result: str, at: float
    ) -> None:
        """Record a request; replaces an expired record of the same key. A key another
        transaction holds raises :class:`RequestRaced` (that transaction is then failed)."""
        t = self._t
        await self._c.execute(
            t.delete().where(
                t.c.scope == scope,
                t.c.request_id == request_id,
                t.c.create_time < at - RETENTION_SECONDS,
            )
        )
        try:
            await self._c.execute(
                t.insert().values(
                    scope=scope,
                    request_id=request_id,
                    fingerprint=fingerprint,
                    result=result,
                    create_time=at,
                )
            )
        except sa.exc.IntegrityError as exc:
            raise RequestRaced(request_id) from exc

    async def purge(self, before: float) -> int:
        """Delete records created before ``before``; returns how many."""
        result = await self._c.execute(self._t.delete().where(self._t.c.create_time < before))
        return int(result.rowcount or 0)
