"""The idempotency contract every Create with a ``request_id`` keeps (AIP-155), through gRPC.

Reusable by any service: describe each Create as a :class:`CreateCase` (how a caller sends
payload ``"A"`` or ``"B"`` with a given ``request_id``, and how to count what exists), then
``await assert_idempotent_create(case, first_caller, second_caller)``. The contract:

1. the same payload again with the same ``request_id`` answers with the same resource and
   creates nothing more;
2. a different payload with that ``request_id`` fails ``INVALID_ARGUMENT`` with
   ``ErrorInfo.reason`` ``REQUEST_ID_REUSED`` and creates nothing;
3. another caller using the same ``request_id`` gets a new resource of its own.

A case may derive unique fields (an email, an id) from the caller's label, so that the second
caller's payload ``"A"`` does not collide with the first's on a uniqueness rule.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import pytest

from tests.support.grpc_tools import error_reason as _reason

Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Caller:
    label: str  # short and unique among the callers of one test: cases derive names from it
    metadata: Metadata


@dataclass(frozen=True)
class CreateCase:
    """One Create method: ``create(caller, request_id, payload)`` with payload ``"A"`` or
    ``"B"`` returns the created resource's name; ``count()`` how many such resources exist."""

    method: str
    create: Callable[[Caller, str, str], Awaitable[str]]
    count: Callable[[], Awaitable[int]]


async def assert_idempotent_create(case: CreateCase, first: Caller, second: Caller) -> None:
    request_id = str(uuid.uuid4())
    before = await case.count()

    created = await case.create(first, request_id, "A")
    assert await case.count() == before + 1, f"{case.method} created nothing"

    replayed = await case.create(first, request_id, "A")
    assert replayed == created, f"{case.method}: a retry answered with another resource"
    assert await case.count() == before + 1, f"{case.method}: a retry created a second resource"

    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await case.create(first, request_id, "B")
    assert reused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, reused.value.details()
    assert _reason(reused.value) == "REQUEST_ID_REUSED"
    assert await case.count() == before + 1, f"{case.method}: a reused request_id created"

    theirs = await case.create(second, request_id, "A")
    assert theirs != created, f"{case.method}: one caller's request_id answered for another's"
    assert await case.count() == before + 2
