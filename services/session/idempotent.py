"""Idempotent creates in the session service: the kit's mechanism (:mod:`corral.libs.idempotency`)
around one use case."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from corral.libs import idempotency
from corral.libs.auth.caller import Caller
from corral.services.session.ports import DuplicateRequest, UnitOfWork

T = TypeVar("T")


@dataclass(frozen=True)
class Create:
    """One create request under idempotency: its key and what it must remember."""

    scope: str
    request_id: str
    fingerprint: str

    async def remember(self, uow: UnitOfWork, result: str) -> None:
        """Record the created resource's name, in the create's own transaction."""
        if self.request_id:
            await uow.idempotency.put(
                self.scope, self.request_id, self.fingerprint, result, time.time()
            )


async def once(
    uow: Callable[[], UnitOfWork],
    caller: Caller,
    method: str,
    request_id: str,
    payload: Any,
    create: Callable[[Create], Awaitable[T]],
    replayed: Callable[[str], Awaitable[T]],
) -> T:
    """``create`` once per (caller, method, request_id); a retry with the same ``payload`` gets
    ``replayed(name)`` of what the first call created, another payload REQUEST_ID_REUSED."""
    request = Create(
        idempotency.scope(method, caller.subject), request_id, idempotency.fingerprint(payload)
    )

    async def earlier() -> str | None:
        async with uow() as work:
            return await idempotency.replay(
                work.idempotency, request.scope, request_id, request.fingerprint
            )

    found = await earlier()
    if found is not None:
        return await replayed(found)
    try:
        return await create(request)
    except (DuplicateRequest, idempotency.RequestRaced):  # a twin committed first: answer as it did
        found = await earlier()
        if found is None:
            raise
        return await replayed(found)
