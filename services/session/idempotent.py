"""Idempotent creates in the session service: the kit's one flow
(:func:`corral.libs.idempotency.create_once`) on the session's unit of work."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from corral.libs.auth.caller import Caller
from corral.libs.idempotency import CreateRequest, create_once
from corral.services.session.ports import UnitOfWork

T = TypeVar("T")


async def once(
    uow: Callable[[], UnitOfWork],
    caller: Caller,
    method: str,
    request_id: str,
    payload: Any,
    create: Callable[[CreateRequest], Awaitable[T]],
    replayed: Callable[[str], Awaitable[T]],
) -> T:
    """``create`` once per (caller, method, request_id); a retry with the same ``payload`` gets
    ``replayed(name)`` of what the first call created, another payload REQUEST_ID_REUSED.
    ``create`` records its result with ``request.remember(uow.idempotency, name, at)`` in the
    transaction that creates it."""

    async def earlier(request: CreateRequest) -> str | None:
        if not request.request_id:
            return None
        async with uow() as work:
            return await request.earlier(work.idempotency)

    request = CreateRequest.of(method, caller.subject, request_id, payload)
    return await create_once(request, earlier, create, replayed)
