"""A turn's usage with identity's ledger, through the outbox (:mod:`corral.libs.outbox`).

When a turn ends, what it used is settled on its slot's reservation, the slot is released, and
the hold of its spending cap given back: one outbox item, written in the transaction that ends
the turn, delivered in that order (what the turn spent is recorded before its cap is given
back). A turn that never ran only gives back what it holds. Identity's SettleUsage and
ReleaseUsage answer a retry as the first call, so the outbox retries the whole item until
identity answers: an outage of identity delays the settle, it never loses it, and the
concurrency slot is freed once identity is back.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Awaitable, Callable, Sequence

from corral.libs.outbox import OutboxItem
from corral.services.session.domain import Usage, now
from corral.services.session.ports import UsageLedger

USAGE = "usage"


def usage_item(
    organization: str, reservation: str, usage: Usage | None, holds: Sequence[str] = ()
) -> OutboxItem:
    """Settle ``usage`` on ``reservation`` (None: nothing to settle, the turn never ran), then
    release it and every one of ``holds``."""
    payload = {
        "reservation": reservation,
        "usage": None if usage is None else dataclasses.asdict(usage),
        "holds": [hold for hold in holds if hold],
    }
    return OutboxItem(str(uuid.uuid4()), USAGE, organization, payload, now())


def deliver(ledger: UsageLedger) -> Callable[[OutboxItem, str], Awaitable[None]]:
    """The outbox's handler of usage items."""

    async def settle(item: OutboxItem, token: str) -> None:
        reservation = item.payload["reservation"]
        usage = item.payload["usage"]
        if reservation and usage is not None:
            await ledger.settle(reservation, Usage(**usage), token=token)  # then releases it
        elif reservation:
            await ledger.release(reservation, token=token)
        for hold in item.payload["holds"]:
            await ledger.release(hold, token=token)

    return settle
